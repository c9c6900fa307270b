"""LoRA adapters applied to their model as its tensors are read: mergekit's `model+lora` references.

A reference `path/to/model+path/to/lora` names a model and a peft LoRA adapter trained on it (a folder
with `adapter_config.json` and `adapter_model.safetensors`). mergekit merges the adapter into the model
with peft before anything else (`merge_and_unload`); here each adapted tensor is changed as it is read,
so no merged copy of the model is written:

    W' = W + s · B A        s = lora_alpha / r   (lora_alpha / √r with `use_rslora`)

with A (r, in) and B (out, r) the adapter's `lora_A` / `lora_B` weights of the module, and for an
embedding (`lora_embedding_A` (r, vocab), `lora_embedding_B` (dim, r)) the transpose (B A)ᵀ. As peft
does on CPU, B A · s is computed in float32 and added to W in float32, then rounded once to W's dtype;
a block of W's rows takes the same rows of B. `rank_pattern` / `alpha_pattern` give some modules their
own r or α, matched as peft matches them (the key, or a dotted suffix of the module's name).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pcbcore.checkpoint import CheckpointReader, TensorInfo
from pcbcore.errors import MergeInputError

ADAPTER_CONFIG = "adapter_config.json"
# peft saves the adapter's tensors under the wrapped model's names: base_model.model.<module>.lora_A.weight
PEFT_PREFIX = "base_model.model."
FACTORS = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}


def split_reference(ref: str) -> tuple[str, str | None]:
    """(model, LoRA adapter or None) of a reference; `a+b` is a LoRA reference unless a folder of that
    name exists (mergekit splits on '+', which it allows once)."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise MergeInputError(f"model reference {ref!r} must be 'model' or 'model+lora' (one '+')")
    return parts[0], parts[1]


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: its factors' tensor names, scaling s and whether it is an embedding."""

    a: str
    b: str
    scaling: float
    embedding: bool


class LoraAdapter:
    """A peft LoRA adapter folder, checked when opened; its factors are read lazily."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        config_file = self.folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise MergeInputError(f"LoRA adapter '{self.folder}' has no {ADAPTER_CONFIG} (a peft LoRA folder holds it and adapter_model.safetensors)")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise MergeInputError(f"LoRA adapter config '{config_file}' is not valid JSON: {exc.msg}") from None
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise MergeInputError(f"adapter '{self.folder}' has peft_type {config.get('peft_type')!r}; only LoRA adapters ('LORA') can be applied")
        if config.get("use_dora"):
            raise MergeInputError(f"LoRA adapter '{self.folder}' uses DoRA ('use_dora: true'), which is not supported; merge it into its model with peft first")
        try:
            r, alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"LoRA adapter config '{config_file}' needs integer 'r' and number 'lora_alpha'") from None
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
        self.reader = CheckpointReader(self.folder, allow_pickle=allow_pickle)
        factors: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        for name in self.reader.tensors:
            module, factor = _factor_of(name)
            if module is None:
                raise MergeInputError(
                    f"LoRA adapter '{self.folder}' holds tensor '{name}', which is not a lora_A / lora_B factor (full modules_to_save and biases are not supported)"
                )
            kind, is_embedding = FACTORS[factor]
            factors.setdefault(module, {})[kind] = name
            embedding[module] = is_embedding
        self.modules: dict[str, LoraModule] = {}
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise MergeInputError(f"LoRA adapter '{self.folder}' has only lora_{next(iter(pair))} for module '{module}'; both lora_A and lora_B are needed")
            module_r = int(rank_pattern[_pattern_key(rank_pattern, module)]) if _pattern_key(rank_pattern, module) else r
            module_alpha = float(alpha_pattern[_pattern_key(alpha_pattern, module)]) if _pattern_key(alpha_pattern, module) else alpha
            scaling = module_alpha / math.sqrt(module_r) if rslora else module_alpha / module_r
            self.modules[f"{module}.weight"] = LoraModule(pair["A"], pair["B"], scaling, embedding[module])

    def check(self, tensors: dict[str, TensorInfo], model: str) -> None:
        """Every adapted weight must be in the model, with the shape B A gives."""
        for name, module in self.modules.items():
            info = tensors.get(name)
            if info is None:
                raise MergeInputError(f"LoRA adapter '{self.folder}' adapts tensor '{name}', which model '{model}' does not have")
            a, b = self.reader.tensors[module.a].shape, self.reader.tensors[module.b].shape
            out_in = (a[1], b[0]) if module.embedding or self.fan_in_fan_out else (b[0], a[1])
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or tuple(info.shape) != out_in:
                raise MergeInputError(
                    f"LoRA adapter '{self.folder}': factors of '{name}' have shapes {list(a)} and {list(b)}, which do not make the model's {list(info.shape)}"
                )

    def delta(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """s · B A (rows [start, stop) of it) in float32, shaped as the weight's rows."""
        module = self.modules[name]
        a = self.reader.read(module.a).to(torch.float32)  # (r, in), or (r, vocab) for an embedding
        b = self.reader.read(module.b).to(torch.float32)  # (out, r), or (dim, r)
        if module.embedding or self.fan_in_fan_out:  # W is (B A)ᵀ-shaped: its rows are A's columns
            a = a if rows is None else a[:, rows[0] : rows[1]]
            return (b @ a).T * module.scaling
        b = b if rows is None else b[rows[0] : rows[1]]
        return (b @ a) * module.scaling

    def close(self) -> None:
        self.reader.close()


def _factor_of(name: str) -> tuple[str | None, str]:
    """(module name in the model, factor key) of an adapter tensor name, or (None, '')."""
    for factor in FACTORS:
        for suffix in (f".{factor}", f".{factor.replace('.weight', '')}.default.weight", f".{factor}.default"):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                return (module.removeprefix(PEFT_PREFIX), factor)
    return None, ""


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The `rank_pattern` / `alpha_pattern` key that applies to `module`, as peft matches it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class LoraReader:
    """A model's reader with a LoRA adapter applied to each adapted tensor as it is read."""

    def __init__(self, model: CheckpointReader, adapter: LoraAdapter, label: str):
        adapter.check(model.tensors, model.label)
        self.model, self.adapter, self.label = model, adapter, label
        self.tensors = model.tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        weight = self.model.read(name, rows)
        if name not in self.adapter.modules:
            return weight
        return (weight.to(torch.float32) + self.adapter.delta(name, rows)).to(weight.dtype)

    def close(self) -> None:
        self.model.close()
        self.adapter.close()


def open_model(ref: str, allow_pickle: bool = False) -> CheckpointReader | LoraReader:
    """The reader of a model reference: a checkpoint folder, or `model+lora` with the adapter applied."""
    model, lora = split_reference(ref)
    reader = CheckpointReader(model, allow_pickle=allow_pickle, label=ref if lora is None else model)
    if lora is None:
        return reader
    try:
        return LoraReader(reader, LoraAdapter(lora, allow_pickle), ref)
    except BaseException:
        reader.close()
        raise
