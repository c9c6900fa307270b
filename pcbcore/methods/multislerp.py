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

mergekit's op order (`multislerp_exact`) computes the unit vectors, their mean, the tangent and the
exponential map as tensors in the working dtype, the weights rounded to it, so each step rounds there.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import FrozenModel, MergeMethod, TensorInputs, WeightedModelParams, unit_lambdas
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


def multislerp_exact(inputs: TensorInputs, params: MultislerpParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order (module docstring), in the working dtype."""
    if not unit_lambdas(model_params):
        return None
    entries = [(theta, m.weight) for theta, m in zip(inputs.models, model_params)]  # the base is never among them
    if len(entries) == 1:
        return entries[0][0]
    base, eps = inputs.base, params.eps
    task_vectors = torch.stack([theta for theta, _ in entries])
    if base is not None:
        task_vectors -= base
    flat = task_vectors.view(task_vectors.shape[0], -1)  # (n, m)
    weights = torch.tensor([w for _, w in entries], dtype=task_vectors.dtype, device=task_vectors.device)
    if params.normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (n, 1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if task_vectors.shape[0] != 2:
            raise MergeInputError(
                f"multislerp: the weighted mean of the task vectors of tensor '{inputs.name}' is zero (antipodal vectors whose weights balance out); change the weights"
            )
        result = (task_vectors[0] * weights[0] + task_vectors[1] * weights[1]).view(task_vectors.shape[1:])  # the straight line
        return result if base is None else result + base
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(task_vectors.shape[1:])
    return result if base is None else result + base


METHOD = MergeMethod("multislerp", MultislerpParams, WeightedModelParams, multislerp_components, whole_tensor=True, base_optional=True, exact=multislerp_exact)
