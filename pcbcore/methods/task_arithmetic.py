"""Task arithmetic (Ilharco et al., ICLR 2023): θ_m = θ_pre + λ Σ_i w_i τ_i.

C_i = w_i τ_i, divided by Σ_j w_j when `normalize` (mergekit's default for this method is false).
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import Block, MergekitMemoryOption, MergeMethod, WeightedModelParams, per_model


class TaskArithmeticParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the sum of weights")


def weighted_sum_components(task_vectors: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """w_i τ_i, over Σ w when normalising (the shared last step of task arithmetic and dare_linear)."""
    components = task_vectors * weights
    if normalize:
        total = weights.sum()
        components = components / (total if total != 0 else 1.0)
    return components


def task_arithmetic_components(task_vectors: torch.Tensor, stats, params: TaskArithmeticParams, model_params: list, block: Block) -> torch.Tensor:
    return weighted_sum_components(task_vectors, per_model(model_params, "weight", task_vectors), params.normalize)


METHOD = MergeMethod("task_arithmetic", TaskArithmeticParams, WeightedModelParams, task_arithmetic_components)
