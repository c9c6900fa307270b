"""NuSLERP: mergekit's spherical interpolation of two task vectors, with weights instead of a t, optionally
row by row (mergekit's `nuslerp`, by Charles Goddard; slerp after Shoemake, SIGGRAPH 1985).

With the base, the two task vectors τ_1, τ_2 are interpolated and added to it, t = w_2 / (w_1 + w_2)
(0.5 where |w_1 + w_2| < 1e-6). Per vector v (the whole tensor flattened, by default; with
`nuslerp_flatten: false`, each row along the last dimension, or with `nuslerp_row_wise: true` each
column, i.e. along dim 0), cos Ω = (τ_1/max(‖τ_1‖, 1e-7))·(τ_2/max(‖τ_2‖, 1e-7)), clamped to [−1, 1], and

    nuslerp = sin((1 − t)Ω)/sin Ω · τ_1 + sin(tΩ)/sin Ω · τ_2,

or the straight line (1 − t)·τ_1 + t·τ_2 where the two are collinear (1 − cos²Ω ≤ 1e-16).

Components form (exact): C_1 = sin((1 − t)Ω)/sin Ω · τ_1, C_2 = sin(tΩ)/sin Ω · τ_2 — the coefficients
depend on the angle, computed per tensor (or per row), and λ_i = 1 is the method. Without a
`base_model` (optional here, as in mergekit) θ_pre = 0, so the same interpolation runs on the models' weights.

mergekit's op order (`nuslerp_exact`) works in the working dtype: the unit vectors, cos Ω, the angle and
(sin((1 − t)Ω)·τ_1 + sin(tΩ)·τ_2) / sin Ω — one division after the sum, not two coefficients — then θ_pre + it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import FrozenModel, MergeMethod, TensorInputs, WeightedModelParams, unit_lambdas
from pcbcore.stages import Block, Stage, Stats

NORM_EPS = 1e-7
COLLINEAR_EPS = 1e-8


class NuslerpParams(FrozenModel):
    nuslerp_flatten: bool = Field(True, description="interpolate each tensor as one flat vector (overrides nuslerp_row_wise)")
    nuslerp_row_wise: bool = Field(False, description="without flatten: interpolate along dim 0 (columns) instead of the last dimension (rows)")


def nuslerp_stages(params: NuslerpParams, model_params: list) -> list[Stage]:
    if len(model_params) != 2:
        raise MergeInputError(f"merge method 'nuslerp' needs exactly two models besides the base (got {len(model_params)})")
    return []


def nuslerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_0, c_1), each (..., 1), with nuslerp(t, v0, v1) = c_0·v0 + c_1·v1 along the last dimension."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    collinear = (1.0 - cos.square()) <= COLLINEAR_EPS**2
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    sin = torch.sin(theta)
    c0 = torch.where(collinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(collinear, t, torch.sin(t * theta) / sin)
    return c0, c1


def nuslerp_components(task_vectors: torch.Tensor, stats: Stats, params: NuslerpParams, model_params: list, block: Block) -> torch.Tensor:
    w1, w2 = (m.weight for m in model_params)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    n, m = task_vectors.shape
    shape = block.shape
    if params.nuslerp_flatten or len(shape) < 2:
        vectors = task_vectors.reshape(n, 1, m)
    else:
        vectors = task_vectors.reshape(n, *shape)
        if params.nuslerp_row_wise:
            vectors = vectors.transpose(1, -1)
    c0, c1 = nuslerp_coefficients(t, vectors[0], vectors[1])
    out = torch.stack([vectors[0] * c0, vectors[1] * c1])
    if not params.nuslerp_flatten and params.nuslerp_row_wise and len(shape) >= 2:
        out = out.transpose(1, -1)
    return out.reshape(n, m)


def nuslerp_rounded(t: float, v0: torch.Tensor, v1: torch.Tensor, params: NuslerpParams) -> torch.Tensor:
    """nuslerp(t, v0, v1) in mergekit's op order, in the inputs' dtype, per flat tensor, row or column."""
    shape = v0.shape
    row_wise = params.nuslerp_row_wise and not params.nuslerp_flatten
    if params.nuslerp_flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:  # along dim 0: columns become the last dimension
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= COLLINEAR_EPS**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if row_wise:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_exact(inputs: TensorInputs, params: NuslerpParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order (module docstring): θ_pre + nuslerp(t, θ_1 − θ_pre, θ_2 − θ_pre), or of the weights without a base."""
    if not unit_lambdas(model_params):
        return None
    (theta1, theta2), (w1, w2) = inputs.models, [m.weight for m in model_params]  # the base is never among them
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    if inputs.base is None:
        return nuslerp_rounded(t, theta1, theta2, params)
    return inputs.base + nuslerp_rounded(t, theta1 - inputs.base, theta2 - inputs.base, params)


METHOD = MergeMethod(
    "nuslerp", NuslerpParams, WeightedModelParams, nuslerp_components, nuslerp_stages, whole_tensor=True, base_optional=True, exact=nuslerp_exact
)
