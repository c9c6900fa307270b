"""SLERP: spherical linear interpolation between the base and one other model (Shoemake, SIGGRAPH 1985), as
mergekit's `slerp` applies it to whole weight tensors.

Per tensor, with a = θ_pre and b = θ_1 flattened: cos Ω = (a/‖a‖)·(b/‖b‖), clamped to [−1, 1] (a norm
of at most 1e-8 counts as 1). Where |cos Ω| > 0.9995 the two are all but collinear and the sines below
would lose every digit, so the result is the straight line (1 − t)·a + t·b; otherwise

    θ_m = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b.

t = 0 gives the base, t = 1 the other model. mergekit computes in float32 whatever the inputs, and so
does this file.

Components form: θ_m = θ_pre + C with C = (c_a + c_b − 1)·θ_pre + c_b·τ_1, where c_a and c_b are the two
coefficients above. They depend on t through the angle, so t is not a coefficient λ of eq. (1): λ = 1
(the default) is the slerp; another λ moves along the straight line from θ_pre through it.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import BaseWeights, FrozenModel, MergeMethod, ModelParams
from pcbcore.stages import Block, Stage, Stats

DOT_THRESHOLD = 0.9995  # mergekit's: above it, interpolate linearly
EPS = 1e-8  # norms at most this count as 1


class SlerpParams(FrozenModel):
    t: float = Field(description="interpolation factor: 0 gives the base, 1 the other model (required, as in mergekit)")


def exactly_one_model(method: str):
    """A stages function that refuses any number of models but one besides the base (before any merging)."""

    def stages(params: FrozenModel, model_params: list) -> list[Stage]:
        if len(model_params) != 1:
            raise MergeInputError(f"merge method '{method}' needs exactly one model besides the base (got {len(model_params)})")
        return []

    return stages


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(c_a, c_b) with slerp(t, a, b) = c_a·a + c_b·b, for flat float32 vectors a and b."""
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    norm_a, norm_b = (norm_a if norm_a > EPS else 1.0), (norm_b if norm_b > EPS else 1.0)
    dot = min(max(float(torch.dot(a / norm_a, b / norm_b)), -1.0), 1.0)  # normalised first: the raw dot may overflow
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_components(task_vectors: torch.Tensor, stats: Stats, params: SlerpParams, model_params: list, block: Block) -> torch.Tensor:
    base = stats.get(BaseWeights).values
    other = base + task_vectors[0]
    c_a, c_b = slerp_coefficients(params.t, base, other)
    # θ_m − θ_pre = (c_a − 1)·θ_pre + c_b·θ_1 = (c_a + c_b − 1)·θ_pre + c_b·τ_1
    return torch.add(task_vectors[0] * c_b, base, alpha=c_a + c_b - 1.0).unsqueeze(0)


METHOD = MergeMethod("slerp", SlerpParams, ModelParams, slerp_components, exactly_one_model("slerp"), whole_tensor=True, needs_base=True)
