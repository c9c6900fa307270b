"""Task arithmetic (Ilharco et al., ICLR 2023): θ_m = θ_pre + λ Σ_i w_i τ_i.

C_i = w_i τ_i, divided by Σ_j w_j when `normalize` (mergekit's default for this method is false).
"""

from __future__ import annotations

from pydantic import Field

from pcbcore.methods.base import Fraction, MergekitMemoryOption, MergeMethod, TensorInputs, WeightedModelParams, scaled_components, shared_lambda
from pcbcore.methods.mergekit_ops import generalized_task_arithmetic


class TaskArithmeticParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the sum of weights")
    rescale: bool = Field(
        False,
        description="accepted, as mergekit accepts it for every task-arithmetic method; no effect (nothing is dropped)",
        json_schema_extra={"no_effect": True},
    )


class TaskArithmeticModelParams(WeightedModelParams):
    density: Fraction = Field(
        1.0, description="accepted, as mergekit accepts it; no effect (task arithmetic keeps every entry)", json_schema_extra={"no_effect": True}
    )


def task_arithmetic_scales(params: TaskArithmeticParams, model_params: list) -> list[float]:
    """w_i, over Σ_j w_j when `params.normalize` (shared with dare_linear's last step)."""
    weights = [m.weight for m in model_params]
    total = sum(weights) if params.normalize else 1.0
    return [w / (total if total != 0 else 1.0) for w in weights]


def task_arithmetic_exact(inputs: TensorInputs, params: TaskArithmeticParams, model_params: list):
    """mergekit's order (`mergekit_ops.generalized_task_arithmetic`, no sparsification, no consensus)."""
    lambda_ = shared_lambda(model_params)
    if lambda_ is None:
        return None
    return generalized_task_arithmetic(inputs, model_params, normalize=params.normalize, lambda_=lambda_)


METHOD = MergeMethod(
    "task_arithmetic",
    TaskArithmeticParams,
    TaskArithmeticModelParams,
    scaled_components(task_arithmetic_scales),
    scales=task_arithmetic_scales,
    exact=task_arithmetic_exact,
    exact_blocks=True,
)
