"""Weighted averaging: uniform model soups, FedAvg (weights = sample counts), checkpoint averaging.

θ_m = Σ_i w_i θ_i / Σ_i w_i (Wortsman et al. 2022; McMahan et al. 2017). Written as eq. (1) with
C_i = w_i τ_i / Σ_j w_j and λ_i = 1, which is exact because the weights sum to one after normalising:
θ_pre + Σ_i w_i (θ_i − θ_pre) / Σ w = Σ_i w_i θ_i / Σ w. mergekit's `linear` with `normalize: false`
(a plain weighted sum Σ w_i θ_i) is not of this form: it merges in mergekit's order only (`linear_exact`),
and is refused where the components form is needed (`compute_dtype`, `lines`, per-model `lambda`, a search).
"""

from __future__ import annotations

from pydantic import Field

from pcbcore.methods.base import FrozenModel, MergeMethod, TensorInputs, WeightedModelParams, scaled_components, unit_lambdas, weights_of
from pcbcore.methods.mergekit_ops import weighted_average


class LinearParams(FrozenModel):
    normalize: bool = Field(True, description="divide by the sum of weights (false: mergekit's plain weighted sum Σ w_i θ_i)")


UNNORMALISED = (
    "key 'parameters.normalize': linear with normalize: false (a plain weighted sum of the models) merges only in "
    "mergekit's order: not with compute_dtype, lines, a per-model lambda or a coefficient search"
)


def linear_scales(params: LinearParams, model_params: list) -> list[float]:
    """w_i / Σ_j w_j."""
    if not params.normalize:
        raise ValueError(UNNORMALISED)
    total = sum(m.weight for m in model_params)
    if total == 0:
        raise ValueError("linear merging needs weights whose sum is not zero")
    return [m.weight / total for m in model_params]


def linear_exact(inputs: TensorInputs, params: LinearParams, model_params: list):
    """mergekit's order: Σ w_i θ_i in float32, one model at a time, then / Σ w_i (`mergekit_ops`)."""
    if not unit_lambdas(model_params):
        return None
    if params.normalize:
        linear_scales(params, model_params)  # the same refusal of weights summing to zero
    return weighted_average(inputs, weights_of(model_params), normalize=params.normalize)


METHOD = MergeMethod(
    "linear",
    LinearParams,
    WeightedModelParams,
    scaled_components(linear_scales),
    base_may_be_a_model=True,
    scales=linear_scales,
    exact=linear_exact,
    components_refusal=lambda params: None if params.normalize else UNNORMALISED,
    exact_blocks=True,
)
