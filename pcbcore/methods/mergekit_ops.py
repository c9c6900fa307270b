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

The sparsifiers follow mergekit's `sparsify.py`: `magnitude` (TIES), `magnitude_outliers` (breadcrumbs),
`bernoulli` (DARE) and `della_magprune` (DELLA), each with mergekit's optional L1 `rescale` (the norm ratio
of the task vector before and after, not 1/density). The random ones draw their keep masks from pcbmerge's
seeded generator (the method passes a `KeepDraw`) where mergekit draws from torch's global one: the same
process, the same masks as pcbmerge's components form, and at density 1 (nothing drawn) mergekit's result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from pcbcore import sort_order
from pcbcore.methods.base import Pending, TensorInputs, shared_lambda
from pcbcore.selection import select_in_memory

# One model's task vector sparsified: (δ_i, that model's parameters, its index among the job's models — the
# seed of its random draws) → δ_i'.
Sparsify = Callable[[torch.Tensor, object, int], torch.Tensor]


def elected_sign(deltas: torch.Tensor) -> torch.Tensor:
    """+1 where Σ_i δ_i ≥ 0 (−0 and 0 included), −1 elsewhere (NaN too), in δ's dtype: mergekit's elected sign
    for the 'sum' consensus."""
    return (deltas.sum(dim=0) >= 0).to(deltas.dtype).mul_(2).sub_(1)


def agreement(deltas: torch.Tensor) -> torch.Tensor:
    """mergekit's 'sum' consensus mask as 1.0/0.0 in δ's dtype: δ_i·s > 0 for the elected sign s = ±1.

    That is mergekit's `sign δ_i == s` exactly: sign δ = +1 where δ > 0 and −1 where δ < 0 (a zero agrees with
    neither, NaN with neither), and δ·(±1) is exact in every float dtype. Two passes over the models where
    mergekit makes eight (a `where` over bool tensors alone costs more than the rest)."""
    return torch.mul(deltas, elected_sign(deltas)).gt_(0)


def elected_mask(deltas: torch.Tensor, method: Literal["sum", "count"], mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit's `get_mask`: whether each δ_i's sign is the elected one — the sign of Σ_i δ_i ('sum',
    TIES) or of Σ_i sign δ_i ('count'), + where that is 0."""
    if method == "sum":
        return agreement(deltas).bool()
    sign = deltas.sign().to(mask_dtype)
    majority = (sign.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def generalized_task_arithmetic(
    inputs: TensorInputs,
    model_params: list,
    *,
    normalize: bool,
    lambda_: float,
    sparsify: Sparsify | None = None,
    consensus: Literal["sum", "count"] | None = None,
) -> torch.Tensor:
    """θ_pre + Δ in mergekit's op order (module docstring), in the working dtype."""
    base = inputs.base
    entries = [(i, theta, params) for i, (theta, params, is_base) in enumerate(zip(inputs.models, model_params, inputs.is_base)) if not is_base]
    if not entries:
        return base
    deltas = base.new_empty((len(entries), base.numel()))
    for k, (i, theta, params) in enumerate(entries):
        if sparsify is None:
            torch.sub(theta.reshape(-1), base.reshape(-1), out=deltas[k])
        else:
            deltas[k] = sparsify(theta - base, params, i).reshape(-1)
    weights = [params.weight for _, _, params in entries]
    return _mixed_in_chunks(base, lambda start, stop: deltas[:, start:stop], weights, normalize, lambda_, consensus)


def exact_task_arithmetic(inputs: TensorInputs, params, model_params: list, sparsify: Sparsify, consensus: bool) -> torch.Tensor | None:
    """A sparsifying method's `exact` (DARE, DELLA, breadcrumbs, TIES with rescale): `generalized_task_arithmetic`
    with the method's `normalize` and, for its TIES-style variant, the 'sum' consensus. None (the components
    form) for per-model λ_i or without a base."""
    lambda_ = shared_lambda(model_params)
    if lambda_ is None or inputs.base is None:
        return None
    return generalized_task_arithmetic(
        inputs, model_params, normalize=params.normalize, lambda_=lambda_, sparsify=sparsify, consensus="sum" if consensus else None
    )


# Entries per chunk of the weighting, consensus and normalisation: their elementwise ops stay in the CPU's caches.
CHUNK = 1 << 18


def _mixed_in_chunks(
    base: torch.Tensor,
    deltas_of: Callable[[int, int], torch.Tensor],
    weights: list[float],
    normalize: bool,
    lambda_: float,
    consensus: Literal["sum", "count"] | None,
) -> torch.Tensor:
    """θ_pre + Δ, CHUNK entries at a time (every op after the sparsify is elementwise or a sum over the
    models of each entry): `deltas_of(start, stop)` gives the sparsified task vectors' columns (n, stop −
    start), which `_mix` overwrites."""
    flat_base = base.reshape(-1)
    weight = torch.tensor(weights, dtype=base.dtype, device=base.device).unsqueeze(-1)  # (n, 1)
    unit = bool((weight == 1).all())
    out = torch.empty_like(flat_base)
    for start in range(0, flat_base.numel(), CHUNK):
        stop = min(start + CHUNK, flat_base.numel())
        out[start:stop] = _mix(flat_base[start:stop], deltas_of(start, stop), weight, unit, normalize, lambda_, consensus)
    return out.reshape(base.shape)


def _mix(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    unit: bool,
    normalize: bool,
    lambda_: float,
    consensus: Literal["sum", "count"] | None,
) -> torch.Tensor:
    """θ_pre + Δ from the sparsified task vectors `deltas` (n, m), which it overwrites: mergekit's weighting
    (`weights` (n, 1) in the working dtype, all 1 when `unit`), consensus, normalisation and λ."""
    if not unit:  # δ·1 is δ to the bit: skipped
        deltas.mul_(weights)
    if consensus is not None:
        # Signs and the elected sign are exact in any dtype, so the mask's dtype (mergekit's `int8_mask`) does
        # not change a bit; 1.0/0.0 in δ's dtype is the cheapest. δ·1.0 and δ·0.0 are mergekit's δ·mask.
        mask = agreement(deltas) if consensus == "sum" else elected_mask(deltas, consensus, deltas.dtype).to(deltas.dtype)
        mixed = deltas.mul_(mask).sum(dim=0)  # in place: δ is not needed after
        # unit weights: Σ_i 1·[agrees_i] is a count, exact in any float dtype up to 256 models
        if unit and deltas.shape[0] <= 256:
            divisor = mask.sum(dim=0).clamp_(min=1)  # a count: 0 → 1 is mergekit's fill, the rest unchanged
        else:
            divisor = mask.mul_(weights).sum(dim=0)
            divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def masked_task_arithmetic(
    inputs: TensorInputs,
    model_params: list,
    densities: list[float],
    *,
    normalize: bool,
    lambda_: float,
    consensus: Literal["sum", "count"] | None = None,
) -> torch.Tensor | Pending:
    """`generalized_task_arithmetic` with TIES's trim without rescale (`magnitude_masks`, δ_i·mask_i at the
    model's density), to the same bits: each mask is chosen from the whole δ_i, then the task vectors are
    made chunk by chunk too, in one reused buffer, instead of whole. `Pending` while the masks are being
    found in the sort threads."""
    base = inputs.base
    entries = [(theta, params, density) for theta, params, density, is_base in zip(inputs.models, model_params, densities, inputs.is_base) if not is_base]
    if not entries:
        return base
    masks = magnitude_masks((theta - base for theta, _, _ in entries), [density for _, _, density in entries])
    weights = [params.weight for _, params, _ in entries]
    thetas = [theta.reshape(-1) for theta, _, _ in entries]
    if busy := sum(isinstance(mask, Future) for mask in masks):
        return Pending(lambda: _masked_mix(base, thetas, masks_of(masks), weights, normalize, lambda_, consensus), min(busy, _cores()))
    return _masked_mix(base, thetas, masks, weights, normalize, lambda_, consensus)


def _masked_mix(
    base: torch.Tensor,
    thetas: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    weights: list[float],
    normalize: bool,
    lambda_: float,
    consensus: Literal["sum", "count"] | None,
) -> torch.Tensor:
    """`masked_task_arithmetic` once its masks are found: the task vectors made chunk by chunk in one
    reused buffer, each masked, then mixed."""
    flat_base = base.reshape(-1)
    buffer = flat_base.new_empty((len(thetas), min(CHUNK, flat_base.numel())))

    def deltas_of(start: int, stop: int) -> torch.Tensor:
        deltas = buffer[:, : stop - start]
        for k, (theta, mask) in enumerate(zip(thetas, masks)):
            torch.sub(theta[start:stop], flat_base[start:stop], out=deltas[k])
            if mask is not None:
                deltas[k].mul_(mask[start:stop])  # δ·True is δ, δ·False ±0: mergekit's δ·mask
        return deltas

    return _mixed_in_chunks(base, deltas_of, weights, normalize, lambda_, consensus)


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


# ---------------------------------------------------------------- mergekit's sparsify, one task vector at a time

RESCALE_EPS = 1e-7  # mergekit's: a norm under this is not rescaled


def rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit's `rescaled_masked_tensor` with the L1 norm: tensor·mask, scaled by ‖tensor‖₁ / ‖tensor·mask‖₁
    (0-d tensors in the tensor's dtype, as mergekit computes them) unless either norm is under 1e-7."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def random_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's random sparsifiers draw and rescale in: the tensor's own, except on the CPU where
    `torch.bernoulli` lacks float16 and mergekit goes through float32 (bfloat16 stays bfloat16)."""
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


def sort_keys(delta: torch.Tensor) -> torch.Tensor:
    """|δ| flat, as mergekit sorts it: in float32 on the CPU, in δ's dtype elsewhere."""
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def argsort_range(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Bool mask of `argsort(w, descending)[start:stop]`: mergekit's own call."""
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.argsort(w, descending=descending)[start:stop]] = True
    return mask


def sort_range_mask(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Bool mask of the entries of flat `w` that torch's unstable sort puts at positions [start, stop).

    Which of the entries equal to a boundary value are in is the sort algorithm's choice (bf16 task vectors
    hold only about a thousand distinct magnitudes per tensor, so a run of them nearly always straddles the
    cut). On the CPU, where mergekit sorts float32, `pcbcore.sort_order` finds that choice in O(n) without
    sorting (faster than the two order statistics below, ties or none). Elsewhere the set is fixed by the
    values alone unless a run straddles a boundary, which two order statistics and two counts tell; only
    then does mergekit's own argsort run."""
    n = w.numel()
    if start >= stop:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    if w.device.type == "cpu" and w.dtype == torch.float32:
        if descending and start == 0:
            return sort_order.top_k_mask(w, stop)
        if not descending:
            return sort_order.middle_mask(w, start, stop)
    lo_rank, hi_rank = (n - stop, n - start) if descending else (start, stop)  # ascending ranks [lo, hi)
    keep = None
    if lo_rank > 0:
        lo = select_in_memory(w.reshape(1, -1), [lo_rank]).item()
        if int((w < lo).sum()) != lo_rank:
            return argsort_range(w, start, stop, descending)
        keep = w >= lo
    if hi_rank < n:
        hi = select_in_memory(w.reshape(1, -1), [hi_rank - 1]).item()
        if int((w <= hi).sum()) != hi_rank:
            return argsort_range(w, start, stop, descending)
        keep = w <= hi if keep is None else keep.logical_and_(w <= hi)
    return keep if keep is not None else torch.ones(n, dtype=torch.bool, device=w.device)


_sort_pool: ThreadPoolExecutor | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def magnitude_masks(deltas: Iterable[torch.Tensor], densities: list[float]) -> list:
    """The flat keep mask of mergekit's `magnitude` without rescale for each δ_i at its density (None:
    density 1 keeps every entry). On the CPU the sort simulations (`pcbcore.sort_order`: numpy, the GIL
    released in each op) run in parallel threads, one per core at most, each started as soon as its keys
    are made; the torch ops that make them run here, so no two threads share torch's thread pool. (`deltas`
    may be a generator: each δ_i is dropped once its keys are made.) The masks still being found in those
    threads are futures: `masks_of` waits for them."""
    global _sort_pool
    parallel = len(densities) > 1 and _cores() > 1
    if parallel and _sort_pool is None:
        _sort_pool = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="pcbmerge-sort")
    masks: list = [None] * len(densities)
    for i, (delta, density) in enumerate(zip(deltas, densities)):
        if density >= 1:
            continue
        if density <= 0 or delta.numel() == 0:
            masks[i] = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
            continue
        keys, k = sort_keys(delta), max(1, int(density * delta.numel()))
        del delta
        if parallel and keys.device.type == "cpu" and keys.dtype == torch.float32:
            masks[i] = _sort_pool.submit(sort_range_mask, keys, 0, k, True)
        else:
            masks[i] = sort_range_mask(keys, 0, k, descending=True)
    return masks


def masks_of(masks: list) -> list[torch.Tensor | None]:
    """`magnitude_masks`' masks, each future waited for."""
    return [mask.result() if isinstance(mask, Future) else mask for mask in masks]


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """mergekit's `magnitude` (TIES's trim): keep the k = max(1, ⌊density·N⌋) entries first in
    `argsort(|δ|, descending=True)`; density 1 returns δ itself."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    (mask,) = masks_of(magnitude_masks([delta], [density]))  # bool: δ·mask is δ·1.0 or δ·0.0, as mergekit's
    return rescaled_masked(delta, mask.reshape_as(delta), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """mergekit's `magnitude_outliers` (breadcrumbs): of `sort(|δ|)`, keep positions [n_bot, n_bot + ⌊density·N⌋)
    with n_bot = max(0, N − ⌊density·N⌋ − ⌊γ·N⌋); density 1 returns δ itself (γ included)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = sort_range_mask(sort_keys(delta), bottom, bottom + target, descending=False)
    return rescaled_masked(delta, mask.reshape_as(delta), rescale)


# Keep draws of one task vector for `bernoulli` and `della_magprune`: keep probabilities (δ's entries in any
# shape, or one 0-d probability for all; any float dtype) → bool mask of the entries kept, each with its
# probability, in δ's shape.
KeepDraw = Callable[[torch.Tensor], torch.Tensor]


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, draw: KeepDraw) -> torch.Tensor:
    """mergekit's `bernoulli` (DARE): keep each entry with probability `density` rounded to the work dtype,
    then `rescaled_masked` (L1) in the work dtype (`random_work_dtype`); density 1 returns δ itself."""
    if density >= 1:
        return delta
    work = random_work_dtype(delta)
    # One keep probability for all: a 0-d tensor (density rounded to the work dtype, as mergekit's full_like
    # holds it) broadcast by the draw; δ·True/False is δ·1.0/0.0.
    mask = draw(torch.tensor(density, dtype=work, device=delta.device))
    return rescaled_masked(delta.to(work), mask, rescale).to(delta.dtype)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, draw: KeepDraw) -> torch.Tensor:
    """mergekit's `della_magprune`: within each slice along dim 1 (a 1-D δ is one row), rank |δ| from 1, and keep
    an entry with probability (density − ε) + rank_norm·2·ε, rank_norm = (rank − min) / (max − min), all in
    the work dtype (bfloat16 ranks round); then `rescaled_masked` (L1). density 1 returns δ itself. The
    ranks come from mergekit's own (unstable) argsort, so each entry's probability is mergekit's."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    work = random_work_dtype(delta)
    shape = delta.shape
    tensor = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(tensor.abs(), dim=1, descending=False)
    positions = torch.arange(tensor.shape[1], device=tensor.device).reshape(1, -1, *([1] * (tensor.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(work) + 1  # = argsort of the argsort
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probabilities = (density - epsilon) + rank_norm * 2 * epsilon
    mask = draw(probabilities).to(work)
    return rescaled_masked(tensor.to(work), mask, rescale).to(delta.dtype).reshape(shape)
