"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522): interpolate between the base and the average of
the fine-tuned models by a ratio read from the angle between their task vectors.

Per tensor (or, with `filter_wise`, per row along the last dimension), with N models: cos θ is the mean
over all pairs i < j of τ_i·τ_j / max(‖τ_i‖‖τ_j‖, 1e-6), each clamped to [−1, 1]. The paper's ratio is

    t = N·cos θ / (1 + (N − 1)·cos θ),        θ_m = t·mean_i θ_i + (1 − t)·θ_pre.

Fine-tunes that agree (cos θ → 1) give t → 1, the plain average; orthogonal ones (cos θ → 0) stay at
the base. Where the denominator is under 1e-6 there is no finite estimate and the base is kept (t = 0),
as mergekit does. mergekit's per-model `weight` has no effect on this method; it is accepted, and ignored,
so its files run unchanged.

Components form (exact): θ_m = θ_pre + Σ_i λ_i·C_i with C_i = t/N · τ_i (λ_i = 1 is the method).

mergekit's op order (`model_stock_exact`), in the working dtype: the offsets θ_i − θ_pre, the pairwise
cosines from their norms' product, t, then t·(Σ_i θ_i / N) + (1 − t)·θ_pre — the average of the weights,
not of the task vectors, so it rounds differently from the components form.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import FrozenModel, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.stages import Block, Stage, Stats


class ModelStockParams(FrozenModel):
    filter_wise: bool = Field(False, description="one ratio per row (along the last dimension) instead of one per tensor")


class ModelStockModelParams(ModelParams):
    weight: float = Field(1.0, description="accepted for mergekit compatibility; Model Stock weighs every model equally")


def model_stock_stages(params: ModelStockParams, model_params: list) -> list[Stage]:
    if len(model_params) < 2:
        raise MergeInputError(f"merge method 'model_stock' needs at least two models besides the base (got {len(model_params)})")
    return []


def model_stock_ratio(task_vectors: torch.Tensor) -> torch.Tensor:
    """t per vector: task_vectors (N, rows, m) → (rows, 1) float32."""
    n = task_vectors.shape[0]
    norms = torch.linalg.vector_norm(task_vectors, dim=-1)  # (N, rows)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (task_vectors[i] * task_vectors[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1.0 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator))


def model_stock_components(task_vectors: torch.Tensor, stats: Stats, params: ModelStockParams, model_params: list, block: Block) -> torch.Tensor:
    n, m = task_vectors.shape
    if m == 0:
        return torch.zeros_like(task_vectors)
    rows = math.prod(block.shape[:-1]) if params.filter_wise and len(block.shape) > 1 else 1  # a 1-D tensor is one row
    vectors = task_vectors.reshape(n, rows, m // rows)
    return (vectors * (model_stock_ratio(vectors) / n)).reshape(n, m)


def model_stock_exact(inputs: TensorInputs, params: ModelStockParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order, each step rounded in the working dtype (module docstring)."""
    if not unit_lambdas(model_params):
        return None
    base = inputs.base
    models = inputs.models  # the base is never among them (a model of the base's name is left out at config load)
    if params.filter_wise:  # one ratio per vector along the last dimension (a 1-D tensor is one vector)
        base, models = (base.unsqueeze(0), [theta.unsqueeze(0) for theta in models]) if base.dim() == 1 else (base, models)
    else:
        base, models = base.reshape(-1), [theta.reshape(-1) for theta in models]
    offsets = [theta - base for theta in models]
    cosines = []
    for i, offset_i in enumerate(offsets):
        for offset_j in offsets[i + 1 :]:
            norms = torch.norm(offset_i, dim=-1) * torch.norm(offset_j, dim=-1)
            cosines.append(((offset_i * offset_j).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(models) / n  # Σ θ_i from 0, one model at a time
    return (t * average + (1 - t) * base).reshape(inputs.base.shape)


METHOD = MergeMethod(
    "model_stock", ModelStockParams, ModelStockModelParams, model_stock_components, model_stock_stages, whole_tensor=True, exact=model_stock_exact
)
