"""mergekit's own sequences of operations, for `MergeMethod.exact` (facts from mergekit 0.1.5's source).

A merge in bf16 or fp16 rounds after every operation; two tools agree to the bit only if they round at the
same places. The components form (`base.combine`) rounds once, in float32 — more precise, and different by
ulps — so a file mergekit could run is merged here in mergekit's order instead (`pcbcore.executor`), and
`compute_dtype: float32` opts into the components form's precision.

`generalized_task_arithmetic` is mergekit's `GeneralizedTaskArithmeticMerge.merge_group`, the core of
task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and della_linear:

    δ_i = θ_i − θ_pre                      (working dtype; the base listed as a model is left out)
    δ_i ← sparsify(δ_i)                    (the method's trim or random drop, if any)
    δ_i ← w_i·δ_i                          (w_i rounded to the working dtype)
    consensus:   m_i = [sign δ_i = elected sign],  Δ = Σ_i m_i δ_i,  d = Σ_i m_i w_i  (d = 1 where 0)
    otherwise:   Δ = Σ_i δ_i,  d = Σ_i w_i  (d = 1 where |d| < 1e-8)
    Δ ← Δ / d if normalize;  Δ ← λ·Δ if λ ≠ 1;  θ = θ_pre + Δ
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from pcbcore.methods.base import TensorInputs

# One model's task vector sparsified: (δ_i, that model's parameters) → δ_i'.
Sparsify = Callable[[torch.Tensor, object], torch.Tensor]


def elected_mask(deltas: torch.Tensor, method: Literal["sum", "count"], mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit's `get_mask`: whether each δ_i's sign is the elected one — the sign of Σ_i δ_i ('sum',
    TIES) or of Σ_i sign δ_i ('count'), + where that is 0."""
    sign = deltas.sign().to(mask_dtype)
    weight = deltas.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    majority = (weight >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def generalized_task_arithmetic(
    inputs: TensorInputs,
    model_params: list,
    *,
    normalize: bool,
    lambda_: float,
    sparsify: Sparsify | None = None,
    consensus: Literal["sum", "count"] | None = None,
    int8_mask: bool = False,
) -> torch.Tensor:
    """θ_pre + Δ in mergekit's op order (module docstring), in the working dtype."""
    base = inputs.base
    entries = [(theta, params) for theta, params, is_base in zip(inputs.models, model_params, inputs.is_base) if not is_base]
    if not entries:
        return base
    deltas = base.new_empty((len(entries), *base.shape))
    for k, (theta, params) in enumerate(entries):
        delta = theta - base
        deltas[k] = delta if sparsify is None else sparsify(delta, params)
    weights = torch.tensor([params.weight for _, params in entries], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus is not None:
        mask = elected_mask(deltas, consensus, torch.int8 if int8_mask else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def weighted_average(inputs: TensorInputs, weights: list[float], normalize: bool = True) -> torch.Tensor:
    """mergekit's `linear`: Σ_i w_i θ_i accumulated in float32 (float64 for float64 inputs) one model at a
    time, divided by Σ_i w_i, rounded back to the working dtype. The base takes part only where listed."""
    first = inputs.models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor(weights, dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(inputs.models, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(weight.sum())
    return result.to(first.dtype)
