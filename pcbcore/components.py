"""The components C_i of eq. (1), stored once so that any λ is a cheap weighted sum (the CMA-ES search).

`compute_components(config, out_dir)` streams the merge without λ and writes C_i (float32) per model;
`StoredComponents(out_dir)` loads them onto a device and `state_dict(lambdas)` builds θ_pre + Σ λ_i C_i in
memory, with one λ per model or, with `groups` G > 1, one per model per contiguous block of layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pcbcore.checkpoint import CheckpointReader, ShardedWriter, atomic_output
from pcbcore.config import MergeConfig
from pcbcore.device import resolve_device
from pcbcore.errors import MergeInputError
from pcbcore.executor import BlockLoader, Progress, block_shape, stream_components
from pcbcore.inputs import open_inputs
from pcbcore.memory import keep_freed_memory
from pcbcore.methods import combine

COMPONENTS_MANIFEST = "components.json"

# The layer number of a tensor: its first purely numeric name segment (`model.layers.3.`, `transformer.h.3.`,
# `blocks.3.`), which is the index into the model's list of layers in every common layout.
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, or None for a tensor outside the layers (embeddings, final norm, head)."""
    found = LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def layer_group(name: str, n_layers: int, groups: int) -> int:
    """The block of a tensor: layer ℓ of L goes to ⌊ℓ·G/L⌋; tensors outside the layers go with the first
    block when they are embeddings and with the last otherwise (final norm, head)."""
    layer = layer_index(name)
    if layer is not None:
        return layer * groups // n_layers
    return 0 if "embed" in name else groups - 1


def compute_components(config: MergeConfig, out_dir: str | Path, *, device: str = "auto", overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Store C_i (float32) for every merged tensor: one safetensors file per model, plus a manifest."""
    keep_freed_memory()
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    inputs = open_inputs(config)
    try:
        with atomic_output(out_dir, overwrite=overwrite) as tmp:
            plan = [(t.name, torch.float32, t.shape) for t in inputs.merged]
            writers = []
            for i in range(len(config.models)):
                (tmp / f"model-{i}").mkdir()
                writers.append(ShardedWriter(tmp / f"model-{i}", plan))
            for info, rows, _, components in stream_components(config, BlockLoader(inputs, dev), progress):
                for i, writer in enumerate(writers):
                    writer.write(info.name, components[i].reshape(block_shape(info, rows)))
            for writer in writers:
                writer.close()
            manifest = {
                "base_model": str(Path(config.base_model).resolve()),
                "models": [str(Path(m).resolve()) for m in config.models],
                "config": config.describe(),
                "out_dtypes": {t.name: str(config.out_dtype or t.dtype).removeprefix("torch.") for t in inputs.merged},
                "passthrough": [t.name for t in inputs.passthrough],
            }
            (tmp / COMPONENTS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        inputs.close()
    return out_dir


class StoredComponents:
    """Components loaded once (onto a device) and combined for any λ: the search's candidate builder."""

    def __init__(self, folder: str | Path, device: str = "auto"):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / COMPONENTS_MANIFEST).read_text())
        self.device = resolve_device(device)
        self.base_dir = Path(manifest["base_model"])
        self.n_models = len(manifest["models"])
        base = CheckpointReader(self.base_dir)
        readers = [CheckpointReader(self.folder / f"model-{i}") for i in range(self.n_models)]
        self.out_dtypes = {k: getattr(torch, v) for k, v in manifest["out_dtypes"].items()}
        self.base = {name: base.read(name).to(self.device, torch.float32) for name in self.out_dtypes}
        self.passthrough = {name: base.read(name) for name in manifest["passthrough"]}
        # (n, *shape) per tensor
        self.components = {name: torch.stack([r.read(name).to(self.device) for r in readers]) for name in self.out_dtypes}
        layers = [layer for name in self.components if (layer := layer_index(name)) is not None]
        self.n_layers = max(layers) + 1 if layers else 1

    def state_dict(self, lambdas, dtype: torch.dtype | None = None, groups: int = 1) -> dict[str, torch.Tensor]:
        """θ_pre + Σ λ_i C_i for every tensor (each in its output dtype unless `dtype` is given).

        With `groups` G > 1, `lambdas` holds G rows of one λ per model (group-major, G × n values) and each
        tensor takes the row of its block of layers (`layer_group`).
        """
        lambdas = torch.as_tensor(lambdas, dtype=torch.float32)
        if lambdas.numel() != groups * self.n_models:
            per = f"{groups} layer groups × {self.n_models} models" if groups > 1 else f"{self.n_models} models"
            raise MergeInputError(f"{lambdas.numel()} coefficients given for {per}")
        rows = lambdas.reshape(groups, self.n_models)
        out = {}
        for name, comps in self.components.items():
            row = rows[layer_group(name, self.n_layers, groups) if groups > 1 else 0]
            merged = combine(self.base[name].reshape(-1), comps.reshape(self.n_models, -1), row).reshape(comps.shape[1:])
            out[name] = merged.to(dtype or self.out_dtypes[name])
        out.update(self.passthrough)
        return out
