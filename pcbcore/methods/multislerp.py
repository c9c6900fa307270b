"""Multi-SLERP: barycentric interpolation of several task vectors on a hypersphere (C. Goddard,
"Multi-SLERP", goddard.blog, 2025; mergekit's `multislerp`).

Per tensor, with task vectors τ_i of norms n_i and weights w_i (divided by their sum when
`normalize_weights`, the default): u_i = τ_i / (n_i + eps) on the unit sphere; their weighted mean
M = Σ w_i u_i, normalised, is the point of tangency, μ = M / ‖M‖; each u_i is projected onto the tangent
plane there, u_i − (u_i·μ)μ, and T = Σ w_i (u_i − (u_i·μ)μ) is mapped back with the exponential map,
μ cos‖T‖ + T sin‖T‖/‖T‖ (‖T‖ taken + eps), then scaled by the mean norm Σ w_i n_i:

    θ_m = θ_pre + Σ_i w_i n_i · (μ cos‖T‖ + T sin‖T‖/‖T‖).

With one model the result is that model. Where ‖M‖ < eps (antipodal task vectors balancing out) two
models are averaged linearly, Σ w_i τ_i, and more are refused, as in mergekit.

Components form (exact): μ and T are linear in the τ_i, so θ_m = θ_pre + Σ_i c_i τ_i with scalar c_i per
tensor (computed below), and C_i = c_i τ_i; λ_i = 1 is the method. Without a `base_model` (optional
here, as in mergekit) θ_pre = 0, so the same interpolation runs on the models' weights.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import FrozenModel, MergeMethod, WeightedModelParams
from pcbcore.stages import Block, Stats


class MultislerpParams(FrozenModel):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="added to norms before dividing by them")
    normalize: bool = Field(True, description="accepted for mergekit compatibility (mergekit's multislerp ignores it; see normalize_weights)")


def multislerp_coefficients(task_vectors: torch.Tensor, weights: torch.Tensor, eps: float, name: str) -> torch.Tensor:
    """c (n,) with multislerp's θ_m − θ_pre = Σ_i c_i τ_i, for task vectors (n, m) and weights (n,)."""
    norms = torch.linalg.vector_norm(task_vectors, dim=-1)  # (n,)
    inverse = 1.0 / (norms + eps)  # u_i = inverse_i · τ_i
    mean = torch.mv(task_vectors.T, weights * inverse)  # M
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if task_vectors.shape[0] == 2:
            return weights.clone()
        raise MergeInputError(
            f"multislerp: the weighted mean of the task vectors of tensor '{name}' is zero (antipodal vectors whose weights balance out); change the weights"
        )
    alpha = weights * inverse / mean_norm  # μ = Σ α_i τ_i
    mu = mean / mean_norm
    dots = torch.mv(task_vectors, mu) * inverse  # u_i · μ
    beta = weights * inverse - (weights * dots).sum() * alpha  # T = Σ β_i τ_i
    tangent_norm = torch.linalg.vector_norm(torch.mv(task_vectors.T, beta)) + eps
    scale = (norms * weights).sum()
    return scale * (torch.cos(tangent_norm) * alpha + torch.sin(tangent_norm) / tangent_norm * beta)


def multislerp_components(task_vectors: torch.Tensor, stats: Stats, params: MultislerpParams, model_params: list, block: Block) -> torch.Tensor:
    if task_vectors.shape[0] == 1:
        return task_vectors.clone()
    weights = torch.tensor([m.weight for m in model_params], dtype=task_vectors.dtype, device=task_vectors.device)
    if params.normalize_weights:
        weights = weights / weights.sum()
    return task_vectors * multislerp_coefficients(task_vectors, weights, params.eps, block.name).unsqueeze(-1)


METHOD = MergeMethod("multislerp", MultislerpParams, WeightedModelParams, multislerp_components, whole_tensor=True, base_optional=True)
