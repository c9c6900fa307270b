"""Task arithmetic (Ilharco et al., ICLR 2023): θ_m = θ_pre + λ Σ_i w_i τ_i.

C_i = w_i τ_i, divided by Σ_j w_j when `normalize` (mergekit's default for this method is false).
"""

from __future__ import annotations

from pydantic import Field

from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, WeightedModelParams, scaled_components


class TaskArithmeticParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the sum of weights")


def task_arithmetic_scales(params: TaskArithmeticParams, model_params: list) -> list[float]:
    """w_i, over Σ_j w_j when `params.normalize` (shared with dare_linear's last step)."""
    weights = [m.weight for m in model_params]
    total = sum(weights) if params.normalize else 1.0
    return [w / (total if total != 0 else 1.0) for w in weights]


METHOD = MergeMethod("task_arithmetic", TaskArithmeticParams, WeightedModelParams, scaled_components(task_arithmetic_scales), scales=task_arithmetic_scales)
