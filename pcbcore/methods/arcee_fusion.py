"""Arcee Fusion (Arcee AI, mergekit's `arcee_fusion`): take the other model's changes only where they matter.

Per tensor, with θ_pre the base and θ_1 the other model: the importance of entry d is |τ_1,d| times the
KL divergence KL(p ‖ q) of its row, p = softmax(θ_1) + 1e-8 and q = softmax(θ_pre) + 1e-8 along the last
dimension (a 1-D tensor is one row). The threshold is median + 1.5·(q3 − q1) of the importances over the
tensor, the quartiles read at sorted index ⌊q·(N − 1)⌋ as mergekit does; entries at or above it take
θ_1's value, the others keep the base's. (mergekit estimates the quartiles of a tensor of more than 10⁶
entries from 10⁶ random draws; here they are always exact.)

Components form (exact): C_1 = [importance ≥ threshold] ⊙ τ_1; λ = 1 is the method.

mergekit's op order (`arcee_fusion_exact`) computes the importances and the threshold in the working dtype
but its mask in float32, so θ_pre + τ_1·mask comes out in float32 (float64 for float64 weights) whatever
the working dtype: the dtype the file is written in without an `out_dtype` (`fusion_dtype`). Its quartiles
are exact here too, so a tensor of more than 10⁶ entries cannot match mergekit's random estimate to the bit.
"""

from __future__ import annotations

import torch

from pcbcore.methods.base import BaseWeights, FrozenModel, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.methods.slerp import exactly_one_model
from pcbcore.selection import select_in_memory
from pcbcore.stages import Block, Stats

KL_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


class ArceeFusionParams(FrozenModel):
    pass


def importance(base: torch.Tensor, other: torch.Tensor, task_vector: torch.Tensor) -> torch.Tensor:
    """|τ| times its row's KL(softmax(θ_1) ‖ softmax(θ_pre)); all (rows, m)."""
    p = torch.softmax(other, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return task_vector.abs() * kl


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(q3 − q1) of the scores, in float32 as mergekit computes it (a 0-d tensor)."""
    flat = scores.reshape(1, -1)
    ranks = [int(q * (flat.shape[-1] - 1)) for q in QUARTILES]
    q1, median, q3 = select_in_memory(flat.expand(len(ranks), -1), ranks)  # one row per rank
    return median + 1.5 * (q3 - q1)


def arcee_fusion_components(task_vectors: torch.Tensor, stats: Stats, params: ArceeFusionParams, model_params: list, block: Block) -> torch.Tensor:
    m = task_vectors.shape[-1]
    if m == 0:
        return torch.zeros_like(task_vectors)
    rows = (-1, block.shape[-1]) if len(block.shape) > 1 else (1, m)
    base = stats.get(BaseWeights).values.reshape(rows)
    task_vector = task_vectors[0].reshape(rows)
    scores = importance(base, base + task_vector, task_vector)
    mask = scores >= fusion_threshold(scores)
    return (task_vector * mask).reshape(1, m)


arcee_fusion_stages = exactly_one_model("arcee_fusion")


def fusion_dtype(working: torch.dtype) -> torch.dtype:
    """The dtype of mergekit's result: the working dtype promoted with its float32 mask."""
    return torch.promote_types(working, torch.float32)


def arcee_fusion_exact(inputs: TensorInputs, params: ArceeFusionParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order (module docstring): importances and quartiles in the working dtype, a float32 mask."""
    if not unit_lambdas(model_params):
        return None
    base, (other,) = inputs.base, inputs.models  # the base is never among the models
    p = torch.softmax(other, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    scores = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered, _ = torch.sort(scores.reshape(-1))
    at = (torch.tensor(QUARTILES) * (ordered.numel() - 1)).long()  # float32 positions, truncated
    q1, median, q3 = ordered[at.to(ordered.device)]
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


METHOD = MergeMethod(
    "arcee_fusion",
    ArceeFusionParams,
    ModelParams,
    arcee_fusion_components,
    arcee_fusion_stages,
    whole_tensor=True,
    needs_base=True,
    exact=arcee_fusion_exact,
    exact_dtype=fusion_dtype,
)
