"""DARE (Yu et al., ICML 2024): Drop And REscale, then task arithmetic or TIES sign election.

Each entry of τ_i is dropped with probability p = 1 − density and survivors are rescaled by 1/density
(`rescale: true`, the default), which keeps the expected task vector unchanged. `dare_linear` then sums
as task arithmetic; `dare_ties` elects signs and takes the disjoint mean as TIES does (without TIES's
magnitude trim). mergekit's defaults: `normalize: false`, `rescale: true` for both.

Reproducibility: a tensor's rows are cut into mask chunks of max(1, DARE_CHUNK_ENTRIES // row length) rows;
the drop mask of (model i, tensor, chunk) is drawn on the CPU (`torch.rand(...) < density`) from a
`torch.Generator` seeded by a hash of (seed, i, tensor name, chunk index), then moved to the device. The
mask is thus a function of the seed and the tensor alone: the same on CPU and GPU, in any tensor order,
and however the engine splits the tensor into blocks (each block draws the chunks it covers; the engine's
streamed blocks are whole chunks).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, SparseModelParams, TensorInputs, scale_rows_, weights_of
from pcbcore.methods.mergekit_ops import bernoulli, exact_task_arithmetic
from pcbcore.methods.task_arithmetic import task_arithmetic_scales
from pcbcore.methods.ties import MajoritySign, disjoint_components, sign_majority_stage
from pcbcore.stages import Block, Stage, Stats, row_spans

# Entries per mask chunk (rounded to whole rows): part of the masks' definition.
DARE_CHUNK_ENTRIES = 1 << 20


class DareParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the (agreeing) sum of weights")
    rescale: bool = Field(True, description="rescale survivors by 1/density")
    seed: int = Field(0, description="seed of the drop masks")
    zero_sign: Literal["positive", "majority"] = Field(
        "positive", description="dare_ties: elected sign where the weighted sum is exactly 0: + (mergekit) or the majority sign (TIES paper's code)"
    )


@dataclass
class KeptMasks:
    """The keep masks drawn in the sign pass, per block index, for the components step to take."""

    by_block: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)


def chunk_generator(seed: int, model_index: int, name: str, chunk: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{model_index}/{name}/{chunk}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def keep_mask(seed: int, model_index: int, density: float, block: Block) -> torch.Tensor:
    """Which entries of the block model `model_index` keeps (bool, flat, on the CPU), from the mask chunks
    the block's rows cover."""
    row = math.prod(block.shape[1:])
    start, stop = block.rows or (0, block.shape[0] if block.shape else 1)
    parts = []
    for chunk, (first, last) in enumerate(row_spans(block.shape, DARE_CHUNK_ENTRIES)):
        if first < stop and start < last and row:
            draws = torch.rand((last - first) * row, generator=chunk_generator(seed, model_index, block.name, chunk))
            parts.append(draws[(max(start, first) - first) * row : (min(stop, last) - first) * row])
    if not parts:
        return torch.zeros(0, dtype=torch.bool)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)) < density


def keep_masks(params: DareParams, model_params: list, block: Block, device: torch.device) -> list[torch.Tensor | None]:
    """Every model's keep mask for the block on `device` (None for a model that keeps everything)."""
    return [None if m.density >= 1.0 else keep_mask(params.seed, i, m.density, block).to(device) for i, m in enumerate(model_params)]


def drop_and_rescale(task_vectors: torch.Tensor, params: DareParams, model_params: list, block: Block, keep: list | None = None) -> torch.Tensor:
    keep = keep if keep is not None else keep_masks(params, model_params, block, task_vectors.device)
    out = torch.empty_like(task_vectors)
    for i, (m, mask) in enumerate(zip(model_params, keep)):
        if mask is None:
            out[i] = task_vectors[i]
            continue
        torch.mul(task_vectors[i], mask, out=out[i])
        if params.rescale:
            out[i].div_(m.density)
    return out


def dare_linear_components(task_vectors: torch.Tensor, stats: Stats, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    dropped = drop_and_rescale(task_vectors, params, model_params, block)
    return scale_rows_(dropped, task_arithmetic_scales(params, model_params))


def dare_ties_stages(params: DareParams, model_params: list) -> list[Stage]:
    # The stats are per tensor (DARE has no model-wide cut), only for the majority-sign tie break. A tensor of
    # several blocks takes a pass for it; the masks drawn there are kept for the components step, which
    # would otherwise draw them again (most of DARE's cost on a CPU).
    def weighted_dropped_keeping_masks(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        keep = stats.setdefault(KeptMasks).by_block[block.index] = keep_masks(params, model_params, block, task_vectors.device)
        return _weighted_dropped(task_vectors, params, model_params, block, keep)

    return [sign_majority_stage(weighted_dropped_keeping_masks)] if params.zero_sign == "majority" else []


def _weighted_dropped(task_vectors: torch.Tensor, params: DareParams, model_params: list, block: Block, keep: list | None = None) -> torch.Tensor:
    return scale_rows_(drop_and_rescale(task_vectors, params, model_params, block, keep), weights_of(model_params))


def dare_ties_components(task_vectors: torch.Tensor, stats: Stats, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    kept = stats.find(KeptMasks)
    keep = kept.by_block.pop(block.index, None) if kept is not None else None
    weighted = _weighted_dropped(task_vectors, params, model_params, block, keep)
    majority = stats.get(MajoritySign).sign if params.zero_sign == "majority" else 1.0
    return disjoint_components(weighted, weights_of(model_params), majority, params.normalize)


def whole_tensor_draw(seed: int, model_index: int, name: str, shape: tuple[int, ...]):
    """A `mergekit_ops.KeepDraw` for one model's whole tensor `name` of `shape`: this module's mask chunks'
    uniforms (the very draws `keep_mask` compares with the density), compared with each entry's keep
    probability (given in any shape of as many entries)."""

    def draw(probabilities: torch.Tensor) -> torch.Tensor:
        draws = uniform_draws(seed, model_index, Block(name, 0, tuple(shape)))
        return draws.to(probabilities.device).reshape(shape) < probabilities

    return draw


def uniform_draws(seed: int, model_index: int, block: Block) -> torch.Tensor:
    """Uniforms in [0, 1) for every entry of a whole tensor (flat, on the CPU), drawn per mask chunk of rows."""
    row = math.prod(block.shape[1:])
    parts = [
        torch.rand((last - first) * row, generator=chunk_generator(seed, model_index, block.name, chunk))
        for chunk, (first, last) in enumerate(row_spans(block.shape, DARE_CHUNK_ENTRIES))
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.zeros(0)


def dare_family_exact(consensus: bool):
    def exact(inputs: TensorInputs, params: DareParams, model_params: list) -> torch.Tensor | None:
        """mergekit's order: each δ_i through `mergekit_ops.bernoulli` (keep probability the density in the work
        dtype, L1 rescale when `rescale`), then generalized task arithmetic (`dare_ties`: with the sign consensus
        of Σ_i w_i·δ_i). None (the components form) for per-model λ_i or `zero_sign: majority`."""
        if consensus and params.zero_sign != "positive":
            return None

        def sparsify(delta: torch.Tensor, m: SparseModelParams, index: int) -> torch.Tensor:
            return bernoulli(delta, m.density, params.rescale, whole_tensor_draw(params.seed, index, inputs.name, tuple(delta.shape)))

        return exact_task_arithmetic(inputs, params, model_params, sparsify, consensus)

    return exact


# mergekit's rescale is a norm over each whole tensor: `exact` sees it whole.
DARE_LINEAR = MergeMethod("dare_linear", DareParams, SparseModelParams, dare_linear_components, exact=dare_family_exact(False), exact_blocks=False)
DARE_TIES = MergeMethod("dare_ties", DareParams, SparseModelParams, dare_ties_components, dare_ties_stages, exact=dare_family_exact(True), exact_blocks=False)
