"""The components C_i of eq. (1), stored once so that any λ is a cheap weighted sum (the CMA-ES search).

`compute_components(config, out_dir)` streams the merge without λ and stores C_i; `StoredComponents(out_dir)`
builds θ_pre + Σ λ_i C_i for any λ, one tensor at a time (`tensors`, or `state_dict` for all of them), with
one λ per model or, with `groups` G > 1, one per model per contiguous block of layers.

Storage, so that a search of an LLM fits one machine (at most `STORED_BYTES_PER_MODEL` = 0.625 bytes per
parameter per model on disk, 2.5 for four experts, and nothing held in memory beyond one tensor):

- `stored`: each model's C_i in bfloat16, block by block, as whichever is smaller: dense, or sparse (a bit
  per entry saying which are non-zero, then the non-zero values). The sparse methods are sparse here: PCB
  keeps r of each τ_i, TIES and DARE their density (and only the entries that agree with the elected sign),
  so with four experts r ≤ 0.2 costs ≤ 4 · (1/8 + 2r) ≈ 2.1 bytes per parameter. bfloat16 rounds each C_i
  entry by at most 2⁻⁹ of itself; a task vector's entries are small next to the weights, so the built
  weight moves by far less than its own bfloat16 rounding (bench/search_bench.py measures it).
- `recompute`: nothing stored; each candidate is the streaming merge itself with λ set (exact). Used when
  the components are fixed multiples of the task vectors (task arithmetic, linear: one pass over the
  inputs, no statistics), when the stored form would exceed the budget (TIES or DARE at a high density),
  and for merges planned from slices or without a base.

Files are read with positioned reads, a block at a time, never memory-mapped whole (as `CheckpointReader`
does): a worker's resident memory grows by one tensor, not by the components.

θ_pre is read as the merge reads it: with a LoRA applied when the base is a `model+lora` reference, and in
the output vocabulary's rows when the config builds one (`tokenizer_source`, `tokenizer:`). A store whose
output vocabulary or chat template differs from the base's also holds the merge's side files (`SIDE_FILES`:
config.json with the output's `vocab_size`, the tokenizer files, the chat template, as `merge_to_folder`
writes them), so a candidate is scored with the tokenizer the written merge will have.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pcbcore.checkpoint import CheckpointReader, atomic_output
from pcbcore.config import MergeConfig
from pcbcore.device import resolve_device
from pcbcore.errors import MergeInputError
from pcbcore.executor import BlockLoader, Progress, block_shape, merged_blocks, stream_components, write_side_files
from pcbcore.inputs import open_inputs
from pcbcore.lora import split_reference
from pcbcore.memory import keep_freed_memory
from pcbcore.methods import combine
from pcbcore.tokenizer import model_folder

COMPONENTS_MANIFEST = "components.json"
COMPONENTS_FORMAT = 2  # 2: bf16, sparse or recomputed (1: dense float32); part of a store's cache key
# The MergeConfig the store was computed from (written by us, read by us): a `recompute` store merges with
# it; a stored one reads its base through it when the merge reads the base changed (a LoRA, a vocabulary).
RECOMPUTE_CONFIG = "merge_config.pkl"
SIDE_FILES = "side_files"  # the merge's config.json, tokenizer and chat template, when they differ from the base's
STORED_BYTES_PER_MODEL = 0.625  # bytes per merged parameter per model: 2.5 for a 4-expert search

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


# ---------------------------------------------------------------- encoding one block of one C_i


def encode_block(values: torch.Tensor) -> tuple[str, bytes, int]:
    """(kind, bytes, non-zeros) of a float block (m,): `zero`, `dense` bf16, or `sparse` (bits, then bf16 values)."""
    values = values.detach().to("cpu", torch.float32).reshape(-1)
    rounded = values.to(torch.bfloat16)
    nonzero = rounded != 0
    nnz = int(nonzero.sum())
    m = values.numel()
    if nnz == 0:
        return "zero", b"", 0
    if (m + 7) // 8 + 2 * nnz < 2 * m:
        bits = np.packbits(nonzero.numpy()).tobytes()
        return "sparse", bits + rounded[nonzero].view(torch.int16).numpy().tobytes(), nnz
    return "dense", rounded.view(torch.int16).numpy().tobytes(), nnz


def decode_block(kind: str, data: bytes, m: int) -> torch.Tensor:
    """The float32 block (m,) that `encode_block` stored."""
    if kind == "zero":
        return torch.zeros(m, dtype=torch.float32)
    if kind == "dense":
        return torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16).float()
    n_bits = (m + 7) // 8
    mask = torch.from_numpy(np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=n_bits), count=m).view(bool))
    values = torch.frombuffer(bytearray(data[n_bits:]), dtype=torch.int16).view(torch.bfloat16).float()
    return torch.zeros(m, dtype=torch.float32).masked_scatter_(mask, values)


# ---------------------------------------------------------------- computing


def loader_for(config: MergeConfig, inputs, device: torch.device) -> BlockLoader:
    """The block loader a merge of `config` reads with (its working and rounding dtypes, as mergekit's)."""
    return BlockLoader(inputs, device, config.working_dtype, config.round_dtype if config.round_task_vectors else None)


def compute_components(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    max_bytes_per_parameter: float | None = None,
) -> Path:
    """Store the components of `config` in `out_dir` (see the module docstring for the two forms).

    `max_bytes_per_parameter`: the budget of the stored form over all models (default
    `STORED_BYTES_PER_MODEL` per model); beyond it the store falls back to `recompute`.
    """
    keep_freed_memory()
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    n = len(config.models)
    budget = max_bytes_per_parameter if max_bytes_per_parameter is not None else STORED_BYTES_PER_MODEL * n
    inputs = open_inputs(config)
    try:
        with atomic_output(out_dir, overwrite=overwrite) as tmp:
            manifest = {
                "base_model": str(model_folder(config.base_model).resolve()),
                "models": [_resolved_ref(m) for m in config.models],
                "config": config.describe(),
                "out_dtypes": {t.name: str(config.out_dtype or t.dtype).removeprefix("torch.") for t in inputs.merged},
                "passthrough": [t.name for t in inputs.passthrough],
                "shapes": {t.name: list(t.shape) for t in inputs.merged},
                "parameters": inputs.numel,
            }
            storage = None
            if config.method.scales is None and not (config.zero_base or config.sliced):
                storage = _store(config, inputs, dev, tmp, n, budget * inputs.numel, progress)
            if storage is None or _reads_base_changed(config):
                (tmp / RECOMPUTE_CONFIG).write_bytes(pickle.dumps(config))
            if storage is None:
                storage = {"form": "recompute"}
            manifest["storage"] = storage
            if inputs.vocabulary is not None or config.chat_template is not None:
                manifest["side_files"] = SIDE_FILES
                manifest["vocab_rows"] = inputs.vocabulary.rows if inputs.vocabulary is not None else None
                (tmp / SIDE_FILES).mkdir()
                write_side_files(config, inputs, tmp / SIDE_FILES)  # what `merge_to_folder` writes besides the weights
            (tmp / COMPONENTS_MANIFEST).write_text(json.dumps(manifest) + "\n")
    finally:
        inputs.close()
    return out_dir


def _resolved_ref(ref: str) -> str:
    """A model reference with its folder (and a LoRA's) made absolute."""
    model, lora = split_reference(ref)
    return str(Path(model).resolve()) if lora is None else f"{Path(model).resolve()}+{Path(lora).resolve()}"


def _reads_base_changed(config: MergeConfig) -> bool:
    """Whether the merge reads θ_pre otherwise than as its folder stores it: a LoRA applied, or permuted
    into the output vocabulary."""
    return config.vocabulary is not None or split_reference(config.base_model)[1] is not None


def _store(config: MergeConfig, inputs, dev: torch.device, tmp: Path, n: int, budget_bytes: float, progress: Progress | None) -> dict | None:
    """Write every model's blocks (bf16, dense or sparse); None (files removed) when over `budget_bytes`."""
    paths = [tmp / f"model-{i}.bin" for i in range(n)]
    index: dict[str, list] = {}  # name -> [[rows, [[kind, offset, nbytes] per model]] per block]
    offsets, total = [0] * n, 0
    files = [open(path, "wb") for path in paths]  # noqa: SIM115 (closed below, on every path)
    try:
        for info, rows, _, components in stream_components(config, loader_for(config, inputs, dev), progress):
            entries = []
            for i in range(n):
                kind, data, _ = encode_block(components[i])
                files[i].write(data)
                entries.append([kind, offsets[i], len(data)])
                offsets[i] += len(data)
                total += len(data)
            index.setdefault(info.name, []).append([list(rows) if rows else None, entries])
            if total > budget_bytes:
                break
    finally:
        for f in files:
            f.close()
    if total > budget_bytes:
        for path in paths:
            path.unlink()
        return None
    return {"form": "stored", "bytes": total, "index": index}


# ---------------------------------------------------------------- building candidates


class StoredComponents:
    """Stored components and the candidate builder of the search: θ_pre + Σ λ_i C_i for any λ, a tensor at
    a time, on `device`."""

    def __init__(self, folder: str | Path, device: str = "auto"):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / COMPONENTS_MANIFEST).read_text())
        self.device = resolve_device(device)
        self.base_dir = Path(manifest["base_model"])
        self.n_models = len(manifest["models"])
        self.out_dtypes = {k: getattr(torch, v) for k, v in manifest["out_dtypes"].items()}
        self.passthrough_names = list(manifest["passthrough"])
        self.storage = manifest.get("storage", {"form": "legacy"})  # legacy: dense float32 per model (older stores)
        self.form = self.storage["form"]
        self.names = list(self.out_dtypes)
        layers = [layer for name in self.names if (layer := layer_index(name)) is not None]
        self.n_layers = max(layers) + 1 if layers else 1
        self.shapes = {k: tuple(v) for k, v in manifest.get("shapes", {}).items()}
        # The output's side files (None: the base's config and the tokenizer source's tokenizer hold) and its
        # vocabulary tensors' rows (None: the base's).
        self.side_files = self.folder / manifest["side_files"] if manifest.get("side_files") else None
        self.vocab_rows = manifest.get("vocab_rows")
        config_file = self.folder / RECOMPUTE_CONFIG
        self._config = pickle.loads(config_file.read_bytes()) if self.form == "recompute" or config_file.is_file() else None
        # θ_pre as the merge read it (a LoRA applied, the vocabulary's rows): through the merge's own inputs.
        self._inputs = open_inputs(self._config) if self.form != "recompute" and self._config is not None and _reads_base_changed(self._config) else None
        self._base = self._inputs.base if self._inputs is not None else CheckpointReader(self.base_dir)
        if not self.shapes:
            self.shapes = {name: tuple(self._base.tensors[name].shape) for name in self.names}
        self._legacy = [CheckpointReader(self.folder / f"model-{i}") for i in range(self.n_models)] if self.form == "legacy" else None
        self._fds = [os.open(self.folder / f"model-{i}.bin", os.O_RDONLY) for i in range(self.n_models)] if self.form == "stored" else None

    @property
    def stored_bytes(self) -> int:
        """Bytes of components on disk (0 for a `recompute` store)."""
        files = [p for p in self.folder.rglob("*") if p.is_file() and p.name not in (COMPONENTS_MANIFEST, RECOMPUTE_CONFIG) and p.parent.name != SIDE_FILES]
        return sum(p.stat().st_size for p in files)

    def close(self) -> None:
        for fd in self._fds or []:
            os.close(fd)
        self._fds = None
        if getattr(self, "_inputs", None) is not None:
            self._inputs.close()
            self._inputs = None

    def _rows(self, lambdas, groups: int) -> torch.Tensor:
        lambdas = torch.as_tensor(lambdas, dtype=torch.float32)
        if lambdas.numel() != groups * self.n_models:
            per = f"{groups} layer groups × {self.n_models} models" if groups > 1 else f"{self.n_models} models"
            raise MergeInputError(f"{lambdas.numel()} coefficients given for {per}")
        return lambdas.reshape(groups, self.n_models)

    def _row(self, rows: torch.Tensor, name: str, groups: int) -> torch.Tensor:
        return rows[layer_group(name, self.n_layers, groups) if groups > 1 else 0]

    def tensors(self, lambdas, dtype: torch.dtype | None = None, groups: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, θ_pre + Σ λ_i C_i) for every tensor, one at a time (each in its output dtype unless `dtype`
        is given), then the base's other tensors unchanged.

        With `groups` G > 1, `lambdas` holds G rows of one λ per model (group-major, G × n values) and each
        tensor takes the row of its block of layers (`layer_group`).
        """
        rows = self._rows(lambdas, groups)
        if self.form == "recompute":
            yield from self._recomputed(rows, dtype, groups)
        else:
            for name in self.names:
                yield name, self._built(name, self._row(rows, name, groups), dtype or self.out_dtypes[name])
        for name in self.passthrough_names:
            yield name, self._base.read(name)

    def _built(self, name: str, lambdas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """θ_pre + Σ λ_i C_i of one tensor, block by block as stored (only the output is whole)."""
        shape = self.shapes[name]
        if self.form == "legacy":
            base = self._base.read(name).to(self.device, torch.float32).reshape(-1)
            components = torch.stack([r.read(name).reshape(-1).to(self.device, torch.float32) for r in self._legacy])
            return combine(base, components, lambdas).reshape(shape).to(dtype)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        flat = out.reshape(-1)
        row_numel = flat.numel() // shape[0] if shape else 1
        for rows, entries in self.storage["index"][name]:
            start, stop = (0, flat.numel()) if rows is None else (rows[0] * row_numel, rows[1] * row_numel)
            block = self._base.read(name, tuple(rows) if rows is not None else None).to(self.device, torch.float32).reshape(-1)
            for i, (kind, offset, nbytes) in enumerate(entries):
                if kind != "zero" and float(lambdas[i]) != 0.0:
                    component = decode_block(kind, os.pread(self._fds[i], nbytes, offset), stop - start).to(self.device)
                    block.add_(component, alpha=float(lambdas[i]))
            flat[start:stop] = block
        return out

    def _recomputed(self, rows: torch.Tensor, dtype: torch.dtype | None, groups: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The streaming merge itself, with λ set (once per layer group, each keeping its own tensors)."""
        for g in range(groups):
            config = self._config.with_lambdas([float(x) for x in rows[g]])
            inputs = open_inputs(config)
            try:
                current, tensor = None, None
                for info, block_rows, merged in merged_blocks(config, loader_for(config, inputs, self.device)):
                    if groups > 1 and layer_group(info.name, self.n_layers, groups) != g:
                        continue
                    if info.name != current:
                        if current is not None:
                            yield current, tensor.to(dtype or self.out_dtypes[current])
                        current, tensor = info.name, torch.empty(info.shape, dtype=torch.float32, device=self.device)
                    target = tensor if block_rows is None else tensor[block_rows[0] : block_rows[1]]
                    target.copy_(merged.reshape(block_shape(info, block_rows)))
                if current is not None:
                    yield current, tensor.to(dtype or self.out_dtypes[current])
            finally:
                inputs.close()

    def state_dict(self, lambdas, dtype: torch.dtype | None = None, groups: int = 1) -> dict[str, torch.Tensor]:
        """Every tensor of `tensors` in one dict (a whole model in memory: small models and tests)."""
        return dict(self.tensors(lambdas, dtype, groups))

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
