"""Passthrough: each output tensor is one input tensor, optionally scaled — mergekit's `passthrough`.

mergekit (`merge_methods/passthrough.py`) takes exactly one input per tensor and returns it, times the
input's `scale` when one is given. It is what "frankenmerges" use: `slices:` that stack layer ranges of
one or several models (`pcbcore.slices`). It needs no base: with none, θ_pre = 0 and τ_1 = θ_1, so in the
components form θ = θ_pre + λ_1·C_1 the component is C_1 = scale·θ_1 (λ_1 = 1).
"""

from __future__ import annotations

from pydantic import Field

from pcbcore.methods.base import FrozenModel, MergeMethod, ModelParams, scaled_components


class PassthroughParams(FrozenModel):
    """No shared parameters."""


class PassthroughModelParams(ModelParams):
    scale: float | None = Field(None, description="multiply the input tensor by this (mergekit's default: none, the tensor as it is)")


def passthrough_scales(params: PassthroughParams, model_params: list) -> list[float]:
    return [1.0 if m.scale is None else m.scale for m in model_params]


METHOD = MergeMethod(
    "passthrough",
    PassthroughParams,
    PassthroughModelParams,
    scaled_components(passthrough_scales),
    scales=passthrough_scales,
    base_optional=True,
    max_models=1,
)
