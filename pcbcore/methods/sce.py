"""SCE: Select, Calculate, Erase (Wan et al., FuseChat, 2024, arXiv 2408.07990), as mergekit's `sce`.

Per tensor, for task vectors τ_1 … τ_n:
1. Select (when `select_topk` < 1): keep, in every task vector, only the entries where the variance over
   the models (population variance) is among the ⌊select_topk · #(non-zero variance)⌋ largest — the
   entries on which the models disagree most. Ties are ranked by position.
2. Calculate: a weight per model, η_i = mean(τ_i²) / Σ_j mean(τ_j²) over the tensor (the uniform 1/n where
   that sum is under 1e-6, as mergekit does).
3. Erase: keep the entries whose sign agrees with the sign of Σ_i τ_i (+ where that sum is 0).

θ_m = θ_pre + Σ_i η_i·[agrees_i]·τ_i / max(Σ_j η_j·[agrees_j], 1e-6).

Components (exact): C_i = η_i·[agrees_i]·selected τ_i / max(Σ_j η_j·[agrees_j], 1e-6).

mergekit's op order (`sce_exact`) is deterministic too (no draw: its selection is a top-k), and runs in the
working dtype: the variance, the top-k of it (`torch.topk`, whose choice among tied variances is the
library's, where the components form's is by position), the sign election, η_i from the mean squares with
their sum taken as a number, and θ_pre + Σ_i η_i[agrees_i]τ_i / max(Σ_j η_j[agrees_j], 1e-6).
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import Fraction, MergekitMemoryOption, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.methods.breadcrumbs import rank_window, sign_agreement
from pcbcore.methods.mergekit_ops import elected_mask
from pcbcore.stages import Block, Stats


class SceParams(MergekitMemoryOption):
    select_topk: Fraction = Field(1.0, description="fraction of the entries of largest variance across models kept")
    normalize: bool = Field(True, description="accepted for mergekit compatibility; SCE always divides by its weights")


def select_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1.0 at the ⌊fraction · #(non-zero variance)⌋ entries of largest variance across models, else 0.0 (m,)."""
    variance = task_vectors.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    return rank_window(variance, variance.numel() - k, k).to(task_vectors.dtype)


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """η_i = mean(τ_i²) / Σ_j mean(τ_j²), or uniform where the sum is under 1e-6. (n, m) → (n, 1)."""
    weights = task_vectors.square().mean(dim=-1)
    total = float(weights.sum())
    if abs(total) < 1e-6:
        return torch.full_like(weights, 1.0 / weights.numel()).unsqueeze(-1)
    return (weights / total).unsqueeze(-1)


def sce_components(task_vectors: torch.Tensor, stats: Stats, params: SceParams, model_params: list, block: Block) -> torch.Tensor:
    selected = task_vectors * select_mask(task_vectors, params.select_topk) if params.select_topk < 1.0 else task_vectors.clone()
    erased = sce_weights(selected) * sign_agreement(selected)  # (n, m)
    divisor = erased.sum(dim=0).clamp_(min=1e-6)
    return selected.mul_(erased).div_(divisor)


def sce_exact(inputs: TensorInputs, params: SceParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order (module docstring), in the working dtype."""
    if not unit_lambdas(model_params):
        return None
    base = inputs.base
    if not inputs.models:
        return base
    mask_dtype = torch.int8 if params.int8_mask else base.dtype
    task_vectors = torch.stack([theta - base for theta in inputs.models])  # (n, *shape); the base is never among them
    if params.select_topk < 1:
        variance = torch.var(task_vectors, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * params.select_topk)  # the product in float32, as a tensor
        selected = torch.zeros_like(variance, dtype=mask_dtype)
        if k > 0:
            selected.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
        task_vectors = task_vectors * selected.unsqueeze(0)
    agrees = elected_mask(task_vectors, "sum", mask_dtype)
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)  # η_i before normalising
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    while weights.dim() < task_vectors.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * agrees
    return base + (task_vectors * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


METHOD = MergeMethod("sce", SceParams, ModelParams, sce_components, whole_tensor=True, exact=sce_exact)
