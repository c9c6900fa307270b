"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795): drop both tails of each task vector.

Per tensor and model, with N entries: the γ·N entries of largest |τ_i| (outliers, `gamma`) and the
smallest, so that ⌊density·N⌋ remain, are zeroed — exactly mergekit's count: the kept entries are those
of ascending |τ_i| rank in [n_bot, n_bot + ⌊density·N⌋), n_bot = max(0, N − ⌊density·N⌋ − ⌊γ·N⌋). Ranks
of equal magnitudes follow their position in the tensor (a stable sort), so the count is exact on bf16
inputs too. At density 1 nothing is dropped (γ included), as in mergekit.

`breadcrumbs` then sums as task arithmetic; `breadcrumbs_ties` elects a sign per entry as mergekit's TIES
does (the sign of Σ_i w_i·sparse τ_i, + where that sum is exactly 0) and keeps the agreeing entries.
mergekit's defaults: `normalize: false` (divide by the (agreeing) sum of weights), `rescale: false` (when
true, each sparse task vector is scaled back to its original L1 norm).

Components (exact): C_i = w_i·sparse τ_i·[agrees] / divisor, with divisor = Σ_j w_j·[agrees_j] (1 where
0) when normalizing, else 1; [agrees] = 1 for `breadcrumbs`.

The helpers here (rank windows, L1 rescale, mergekit's sign consensus) are shared with DELLA and SCE.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.kernels import sum_rows
from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, SparseModelParams, TensorInputs, weights_of
from pcbcore.methods.mergekit_ops import exact_task_arithmetic, magnitude_outliers
from pcbcore.selection import select_in_memory
from pcbcore.stages import Block, Stats

RESCALE_EPS = 1e-7  # mergekit's: an L1 norm under this is not rescaled


class BreadcrumbsParams(MergekitMemoryOption):
    normalize: bool = Field(False, description="divide by the (agreeing) sum of weights")
    rescale: bool = Field(False, description="scale each sparse task vector back to its original L1 norm")


class BreadcrumbsModelParams(SparseModelParams):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of largest-magnitude entries dropped as outliers")


def rank_window(values: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Bool mask of the entries of a flat tensor whose ascending rank is in [start, start + count), ties
    ranked by position (as a stable sort would), without sorting: the two boundary values are order
    statistics, and only the entries equal to a boundary value need their positions."""
    n = values.numel()
    stop = min(start + count, n)
    if start >= stop:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    lo, hi = select_in_memory(values.reshape(1, -1), [start]).item(), select_in_memory(values.reshape(1, -1), [stop - 1]).item()
    keep = (values > lo) & (values < hi)
    below_lo = int((values < lo).sum())
    if lo == hi:  # one run of equal values spans the window: ranks below_lo, below_lo + 1, … by position
        equal = (values == lo).nonzero().squeeze(-1)
        keep[equal[start - below_lo : stop - below_lo]] = True
        return keep
    at_lo = (values == lo).nonzero().squeeze(-1)
    keep[at_lo[start - below_lo :]] = True  # the last of the run at lo, from rank `start` on
    at_hi = (values == hi).nonzero().squeeze(-1)
    below_hi = int((values < hi).sum())
    keep[at_hi[: stop - below_hi]] = True  # the first of the run at hi, up to rank stop − 1
    return keep


def drop_outliers(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's `magnitude_outliers` mask of one flat task vector (bool)."""
    n = task_vector.numel()
    kept = int(density * n)
    top = int(gamma * n)
    return rank_window(task_vector.abs(), max(0, n - kept - top), kept)


def rescale_l1(task_vector: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """`sparse` scaled to the L1 norm of `task_vector` (mergekit's `rescale`; in place), unless either norm is tiny."""
    before, after = float(task_vector.abs().sum()), float(sparse.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return sparse
    return sparse.mul_(before / after)


def sign_agreement(weighted: torch.Tensor) -> torch.Tensor:
    """mergekit's TIES consensus: 1.0 where an entry's sign is the sign of Σ_i weighted_i (+ where the sum is 0),
    else 0.0 (zeros never agree). weighted (n, m) → (n, m) float32."""
    elected = torch.where(sum_rows(weighted) >= 0, 1.0, -1.0)
    return (torch.sign(weighted) == elected).to(weighted.dtype)


def weighted_mean_components(weighted: torch.Tensor, weights: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic after the sparsification: w_i·τ_i (`weighted`, in place) kept
    where it agrees with the elected sign (`consensus`), over the (agreeing) sum of weights (`normalize`)."""
    w = torch.tensor(weights, dtype=weighted.dtype, device=weighted.device).unsqueeze(-1)
    if consensus:
        agrees = sign_agreement(weighted)
        weighted.mul_(agrees)
        if normalize:
            divisor = (w * agrees).sum(dim=0)
            weighted.div_(divisor.masked_fill_(divisor == 0, 1.0))
    elif normalize:
        total = sum(weights)
        weighted.div_(1.0 if abs(total) < 1e-8 else total)
    return weighted


def breadcrumbs_family(consensus: bool):
    def components(task_vectors: torch.Tensor, stats: Stats, params: BreadcrumbsParams, model_params: list, block: Block) -> torch.Tensor:
        sparse = torch.zeros_like(task_vectors)
        for i, m in enumerate(model_params):
            if m.density >= 1.0:
                sparse[i] = task_vectors[i]
                continue
            mask = drop_outliers(task_vectors[i], m.density, m.gamma)
            torch.mul(task_vectors[i], mask, out=sparse[i])
            if params.rescale:
                rescale_l1(task_vectors[i], sparse[i])
        weights = weights_of(model_params)
        for row, weight in zip(sparse, weights):
            row.mul_(weight)
        return weighted_mean_components(sparse, weights, consensus, params.normalize)

    return components


def breadcrumbs_family_exact(consensus: bool):
    def exact(inputs: TensorInputs, params: BreadcrumbsParams, model_params: list) -> torch.Tensor | None:
        """mergekit's order: each δ_i through `mergekit_ops.magnitude_outliers` (its sort's choice among entries
        tied at either end of the window), then generalized task arithmetic (`breadcrumbs_ties`: with the sign
        consensus of Σ_i w_i·δ_i). None (the components form) for per-model λ_i."""
        return exact_task_arithmetic(inputs, params, model_params, lambda delta, m, _: magnitude_outliers(delta, m.density, m.gamma, params.rescale), consensus)

    return exact


def _method(name: str, consensus: bool) -> MergeMethod:
    components, exact = breadcrumbs_family(consensus), breadcrumbs_family_exact(consensus)
    return MergeMethod(name, BreadcrumbsParams, BreadcrumbsModelParams, components, whole_tensor=True, exact=exact, exact_blocks=False)


BREADCRUMBS = _method("breadcrumbs", consensus=False)
BREADCRUMBS_TIES = _method("breadcrumbs_ties", consensus=True)
