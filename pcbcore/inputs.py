"""The merge's inputs: the base and the fine-tuned models, opened, and the plan of which tensors merge.

Checked before any heavy work, the same way for checkpoint folders and for state dicts in memory: every
floating-point tensor of the base merges and must be in every model with the same shape; the base's other
tensors (integer buffers) are copied from it; a model may hold no tensor that the base lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pcbcore.checkpoint import CheckpointReader, TensorInfo
from pcbcore.config import MergeConfig
from pcbcore.errors import MergeInputError


class TensorReader(Protocol):
    """What the executor reads a checkpoint through (`CheckpointReader`, `StateDictReader`)."""

    label: str
    tensors: dict[str, TensorInfo]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass
class MergeInputs:
    """Opened checkpoints and the tensor plan: which tensors merge, which are copied from the base."""

    base: TensorReader
    models: list[TensorReader]
    merged: list[TensorInfo]
    passthrough: list[TensorInfo]
    # Models that are the base itself (linear lists it among the models): their task vectors are exactly 0.
    same_as_base: frozenset[int] = frozenset()

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.merged)

    def close(self) -> None:
        for reader in (self.base, *self.models):
            reader.close()


def plan_inputs(base: TensorReader, models: list[TensorReader], same_as_base: frozenset[int] = frozenset()) -> MergeInputs:
    """Split the base's tensors into merged (floating point) and copied ones, and check that every model's
    tensors line up with the base's."""
    merged, passthrough = [], []
    for info in base.tensors.values():
        (merged if info.dtype.is_floating_point else passthrough).append(info)
    for reader in models:
        for info in merged:
            other = reader.tensors.get(info.name)
            if other is None:
                raise MergeInputError(f"tensor '{info.name}' is in base model '{base.label}' but missing from model '{reader.label}'")
            if other.shape != info.shape:
                raise MergeInputError(
                    f"tensor '{info.name}' has shape {list(info.shape)} in base model '{base.label}' but {list(other.shape)} in model '{reader.label}'"
                )
        extra = sorted(set(reader.tensors) - set(base.tensors))
        if extra:
            raise MergeInputError(f"tensor '{extra[0]}' is in model '{reader.label}' but not in base model '{base.label}'")
    return MergeInputs(base, models, merged, passthrough, same_as_base)


def open_inputs(config: MergeConfig) -> MergeInputs:
    """Open the base and every model and check, before any heavy work, that their tensors line up."""
    allow = config.raw.allow_pickle
    base = CheckpointReader(config.base_model, allow_pickle=allow)
    models = [CheckpointReader(m, allow_pickle=allow) for m in config.models]
    base_folder = Path(config.base_model).resolve()
    same = frozenset(i for i, m in enumerate(config.models) if Path(m).resolve() == base_folder)
    return plan_inputs(base, models, same)


class StateDictReader:
    """A `CheckpointReader` stand-in over a dict of tensors (for merging tensors already in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str):
        self.label = label
        self._tensors = tensors
        self.tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), Path(label)) for k, v in tensors.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[name]
        return t if rows is None else t[rows[0] : rows[1]]

    def close(self) -> None:
        pass
