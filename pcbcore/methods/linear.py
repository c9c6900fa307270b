"""Weighted averaging: uniform model soups, FedAvg (weights = sample counts), checkpoint averaging.

θ_m = Σ_i w_i θ_i / Σ_i w_i (Wortsman et al. 2022; McMahan et al. 2017). Written as eq. (1) with
C_i = w_i τ_i / Σ_j w_j and λ_i = 1, which is exact because the weights sum to one after normalising:
θ_pre + Σ_i w_i (θ_i − θ_pre) / Σ w = Σ_i w_i θ_i / Σ w. mergekit's `linear` with `normalize: false`
(a plain weighted sum Σ w_i θ_i) is not of this form and is refused at config load.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pcbcore.methods.base import FrozenModel, MergeMethod, TensorInputs, WeightedModelParams, scaled_components, unit_lambdas, weights_of
from pcbcore.methods.mergekit_ops import weighted_average


class LinearParams(FrozenModel):
    normalize: bool = Field(True, description="divide by the sum of weights (must stay true)")

    @model_validator(mode="after")
    def _only_normalized(self) -> LinearParams:
        if not self.normalize:
            raise ValueError("linear merging needs normalize: true (an unnormalised weighted sum of models is not supported)")
        return self


def linear_scales(params: LinearParams, model_params: list) -> list[float]:
    """w_i / Σ_j w_j."""
    total = sum(m.weight for m in model_params)
    if total == 0:
        raise ValueError("linear merging needs weights whose sum is not zero")
    return [m.weight / total for m in model_params]


def linear_exact(inputs: TensorInputs, params: LinearParams, model_params: list):
    """mergekit's order: Σ w_i θ_i in float32, one model at a time, then / Σ w_i (`mergekit_ops`)."""
    linear_scales(params, model_params)  # the same refusal of weights summing to zero
    return weighted_average(inputs, weights_of(model_params)) if unit_lambdas(model_params) else None


METHOD = MergeMethod(
    "linear",
    LinearParams,
    WeightedModelParams,
    scaled_components(linear_scales),
    base_may_be_a_model=True,
    scales=linear_scales,
    exact=linear_exact,
    exact_blocks=True,
)
