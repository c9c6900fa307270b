"""DARE (Yu et al., ICML 2024): Drop And REscale, then task arithmetic or TIES sign election.

Each entry of τ_i is dropped with probability p = 1 − density and survivors are rescaled by 1/density
(`rescale: true`, the default), which keeps the expected task vector unchanged. `dare_linear` then sums
as task arithmetic; `dare_ties` elects signs and takes the disjoint mean as TIES does (without TIES's
magnitude trim). mergekit's defaults: `normalize: false`, `rescale: true` for both.

Reproducibility: the drop mask of (model i, tensor, row block) is drawn on the CPU from a
`torch.Generator` seeded by a hash of (seed, i, tensor name, block index), then moved to the device. The
same seed therefore gives the same merge on CPU and GPU, in any tensor order. Blocks are whole rows of
at most DARE_BLOCK_ELEMENTS entries (`pcbcore.executor.blocks_of`), part of the mask's definition.
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, SparseModelParams, scale_rows_, weights_of
from pcbcore.methods.task_arithmetic import task_arithmetic_scales
from pcbcore.methods.ties import disjoint_components, sign_majority_stage
from pcbcore.stats import Block, Stage, Stats


# 2^24 entries per block: fixed, as the drop masks of a seed depend on it.
DARE_BLOCK_ELEMENTS = 1 << 24


class DareParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the (agreeing) sum of weights")
    rescale: bool = Field(True, description="rescale survivors by 1/density")
    seed: int = Field(0, description="seed of the drop masks")


def block_generator(seed: int, model_index: int, block: Block) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{model_index}/{block.name}/{block.index}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def drop_and_rescale(task_vectors: torch.Tensor, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    out = torch.empty_like(task_vectors)
    for i, m in enumerate(model_params):
        if m.density >= 1.0:
            out[i] = task_vectors[i]
            continue
        keep = torch.rand(task_vectors.shape[-1], generator=block_generator(params.seed, i, block)) < m.density
        torch.mul(task_vectors[i], keep.to(task_vectors.device), out=out[i])
        if params.rescale:
            out[i].div_(m.density)
    return out


def dare_linear_components(task_vectors: torch.Tensor, stats: Stats, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    dropped = drop_and_rescale(task_vectors, params, model_params, block)
    return scale_rows_(dropped, task_arithmetic_scales(params, model_params))


def dare_ties_stages(params: DareParams, model_params: list) -> list[Stage]:
    # The stats are per tensor (DARE has no model-wide cut), only for the majority-sign tie break.
    return [sign_majority_stage(lambda task_vectors, stats, block: _weighted_dropped(task_vectors, params, model_params, block))]


def _weighted_dropped(task_vectors: torch.Tensor, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    return scale_rows_(drop_and_rescale(task_vectors, params, model_params, block), weights_of(model_params))


def dare_ties_components(task_vectors: torch.Tensor, stats: Stats, params: DareParams, model_params: list, block: Block) -> torch.Tensor:
    weighted = _weighted_dropped(task_vectors, params, model_params, block)
    return disjoint_components(weighted, weights_of(model_params), stats["majority"], params.normalize)


DARE_LINEAR = MergeMethod("dare_linear", DareParams, SparseModelParams, dare_linear_components, block_elements=DARE_BLOCK_ELEMENTS)
DARE_TIES = MergeMethod("dare_ties", DareParams, SparseModelParams, dare_ties_components, dare_ties_stages, block_elements=DARE_BLOCK_ELEMENTS)
