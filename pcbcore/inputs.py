"""The merge's inputs: the base and the fine-tuned models, opened, and the plan of which tensors merge.

Checked before any heavy work, the same way for checkpoint folders and for state dicts in memory: every
floating-point tensor of the base merges and must be in every model with the same shape; the base's other
tensors (integer buffers) are copied from it; a model may hold no tensor that the base lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pcbcore.checkpoint import TensorInfo
from pcbcore.config import MergeConfig
from pcbcore.errors import MergeInputError
from pcbcore.lora import open_model, split_reference


class TensorReader(Protocol):
    """What the executor reads a checkpoint through (`CheckpointReader`, `StateDictReader`)."""

    label: str
    tensors: dict[str, TensorInfo]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TensorJob:
    """Where one output tensor's inputs come from, and the method's parameters for it.

    For a `models:` merge every input is the tensor of the same name; a `slices:` merge reads layer k of
    the output from layer start + offset of each source (`pcbcore.slices`).
    """

    info: TensorInfo  # the output tensor: name, dtype, shape
    base: tuple[TensorReader, str] | None  # θ_pre's reader and tensor name (None: θ_pre = 0)
    models: tuple[tuple[int, TensorReader, str], ...]  # (index into the config's models, reader, tensor name)
    params: Any = None  # the method's parameters resolved for this tensor (None: the config's)
    model_params: tuple = ()  # per input model, in the order of `models`
    zero: frozenset[int] = frozenset()  # positions in `models` that are the base itself: τ = 0

    @property
    def indices(self) -> list[int]:
        return [index for index, _, _ in self.models]


@dataclass
class MergeInputs:
    """Opened checkpoints and the tensor plan: which tensors merge, which are copied from the base."""

    base: TensorReader | None
    models: list[TensorReader]
    merged: list[TensorInfo]
    passthrough: list[TensorInfo]
    # Models that are the base itself (linear lists it among the models): their task vectors are exactly 0.
    same_as_base: frozenset[int] = frozenset()
    # One job per merged tensor, by output name (filled by `plan_inputs` or `pcbcore.slices`).
    jobs: dict[str, TensorJob] = field(default_factory=dict)
    # Where each copied (non-float) tensor comes from, by output name.
    copied_from: dict[str, tuple[TensorReader, str]] = field(default_factory=dict)
    # The output's layer count when it differs from the base's (slices).
    num_layers: int | None = None
    # Other opened checkpoints a slice reads from (neither the base nor one of `models`).
    extra_readers: list = field(default_factory=list)
    # The output vocabulary the readers permute the embeddings into (`pcbcore.tokenizer`; None: none built).
    vocabulary: Any = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.merged)

    def read_copied(self, name: str) -> torch.Tensor:
        reader, source = self.copied_from.get(name) or (self.base, name)
        return reader.read(source)

    def close(self) -> None:
        for reader in {id(r): r for r in (self.base, *self.models, *self.extra_readers) if r is not None}.values():
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
    inputs = MergeInputs(base, models, merged, passthrough, same_as_base)
    zero = frozenset(same_as_base)
    for info in merged:
        inputs.jobs[info.name] = TensorJob(info, (base, info.name), tuple((i, reader, info.name) for i, reader in enumerate(models)), zero=zero)
    return inputs


def open_inputs(config: MergeConfig) -> MergeInputs:
    """Open the base and every model and check, before any heavy work, that their tensors line up; then
    resolve every tensor's parameters (gradients, filters), so a bad value is refused before any output."""
    from pcbcore.slices import plan_slices, refuse_multi_module, resolve_job_params
    from pcbcore.tokenizer import plan_vocabulary

    allow = config.raw.allow_pickle
    vocabulary = plan_vocabulary(config)
    opened: dict[str, TensorReader] = {}

    def open_reader(ref: str) -> TensorReader:
        """The reader of a model reference (a LoRA applied, the vocabulary permuted), once per reference."""
        if ref not in opened:
            try:
                reader = open_model(ref, allow)
            except MergeInputError as exc:
                if split_reference(ref)[1] is None:
                    raise
                raise MergeInputError(f"{config.source}: key '{_key_of(config, ref)}': {exc}") from None  # a LoRA: say which entry
            if config.module is not None or config.sliced:
                try:
                    refuse_multi_module(config, ref, reader)
                except BaseException:
                    reader.close()
                    raise
            opened[ref] = reader if vocabulary is None else vocabulary.wrap(ref, reader)
        return opened[ref]

    try:
        if config.zero_base or config.sliced:
            inputs = plan_slices(config, allow, open_reader)
        else:
            base = open_reader(config.base_model)
            models = [open_reader(m) for m in config.models]
            same = frozenset(i for i, m in enumerate(config.models) if m == config.base_model or _same_folder(m, config.base_model))
            inputs = resolve_job_params(config, plan_inputs(base, models, same))
    except BaseException:
        for reader in opened.values():
            reader.close()
        raise
    inputs.vocabulary = vocabulary
    return inputs


def _key_of(config: MergeConfig, ref: str) -> str:
    """The key of the file that names `ref` first (`base_model`, `models[2].model`, `slices[0].sources[1].model`)."""
    if ref == config.base_model and config.raw.base_model is not None:
        return "base_model"
    return next((f"{s.where}.model" for spec in config.slices for s in spec.sources if s.model == ref), config.models_key)


def _same_folder(a: str, b: str) -> bool:
    """Whether two plain model references are the same folder (a LoRA reference is its own model)."""
    (folder_a, lora_a), (folder_b, lora_b) = split_reference(a), split_reference(b)
    return lora_a is None and lora_b is None and Path(folder_a).resolve() == Path(folder_b).resolve()


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
