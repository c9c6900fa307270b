"""Task arithmetic (Ilharco et al., ICLR 2023): θ_m = θ_pre + λ Σ_i w_i τ_i.

C_i = w_i τ_i, divided by Σ_j w_j when `normalize` (mergekit's default for this method is false).
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import Block, MergekitMemoryOption, MergeMethod, WeightedModelParams, per_model_values


class TaskArithmeticParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the sum of weights")


def task_arithmetic_scales(params: TaskArithmeticParams, model_params: list) -> list[float]:
    """w_i, over Σ_j w_j when `params.normalize` (shared with dare_linear's last step)."""
    weights = [m.weight for m in model_params]
    total = sum(weights) if params.normalize else 1.0
    return [w / (total if total != 0 else 1.0) for w in weights]


def task_arithmetic_components(task_vectors: torch.Tensor, stats, params: TaskArithmeticParams, model_params: list, block: Block) -> torch.Tensor:
    return task_vectors * per_model_values(task_arithmetic_scales(params, model_params), task_vectors)


METHOD = MergeMethod("task_arithmetic", TaskArithmeticParams, WeightedModelParams, task_arithmetic_components, scales=task_arithmetic_scales)
