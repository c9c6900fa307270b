"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: keep exactly k = max(1, ⌊density·D⌋) entries of each task vector, those of largest magnitude over
   the scope, as mergekit does (`sparsify.magnitude`; density 1 keeps all). The paper trims over the whole
   model: `scope: model`; mergekit trims each tensor: `scope: tensor`, the default here as there. The cut
   is the value of ascending rank D − k of |τ_i|, found by exact radix select. Entries above it are kept;
   of the entries equal to it (bf16 task vectors hold only a few hundred distinct magnitudes per tensor),
   the first ones in scope order (tensors in order, then flat index) fill the k — a deterministic rule,
   the same on every device (mergekit's unstable argsort keeps some k of them).
2. Elect: the sign of Σ_i w_i·trimmed τ_i per entry. Where that sum is exactly zero, mergekit takes +1
   (`zero_sign: positive`, the default); the paper's code takes the sign of the sum of all elected signs
   over the scope (`zero_sign: majority`, its "majority" rule) — one more pass.
3. Disjoint merge: average only the entries whose sign agrees with the elected one, dividing by the
   (weighted) count of agreeing non-zero entries when `normalize` (the default, as in mergekit).

Components: C_i = w_i·trimmed τ_i·[agrees] / Σ_j w_j·[agrees_j].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from pcbcore.kernels import count_rows, sign_balance, sum_rows, zero_past_first_
from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, Pending, Scope, SparseModelParams, TensorInputs, scale_rows_, shared_lambda, weights_of
from pcbcore.methods.mergekit_ops import exact_task_arithmetic, magnitude, masked_task_arithmetic
from pcbcore.selection import KthSmallest, OrderStatistic
from pcbcore.stages import Block, ReduceFn, Stage, Stats


class TiesParams(MergekitMemoryOption):
    normalize: bool = Field(True, description="divide by the weighted count of agreeing entries")
    scope: Scope = Field("tensor", description="trim over each tensor (mergekit) or the whole model (TIES paper)")
    zero_sign: Literal["positive", "majority"] = Field(
        "positive", description="elected sign where the weighted sum is exactly 0: + (mergekit) or the scope's majority sign (TIES paper's code)"
    )
    rescale: bool = Field(False, description="mergekit's L1 rescaling of each trimmed task vector (in mergekit's order only)")


RESCALED = (
    "key 'parameters.rescale': ties with rescale: true (mergekit's L1 rescale after the trim) merges only in "
    "mergekit's order: not with compute_dtype, lines, scope: model, zero_sign: majority, a per-model lambda or a coefficient search"
)


@dataclass
class TrimCut:
    """Per task, the smallest |τ_i| that top-k keeps at the model's density over the scope."""

    cut: torch.Tensor  # (n,) float32
    keep_none: torch.Tensor  # (n,) bool: the task keeps no entry (its density rounds to 0 entries)
    # |τ| of the block (n, m) when it is the whole scope, computed by the selection; the components step
    # takes it (and zeroes it in place), so it is used once.
    magnitudes: torch.Tensor | None = None


@dataclass
class MajoritySign:
    """The sign of the sum of all elected signs over the scope: TIES's tie break where Σ_i w_i·τ_i = 0."""

    sign: float | None  # ±1.0; None when the scope is one block: the components step takes it from the block


@dataclass
class TieAllowance:
    """Per block of a multi-block scope, how many entries equal to the cut each task keeps there (n,)."""

    by_block: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def _kept_counts(stats: Stats, model_params: list) -> torch.Tensor:
    """k per task: mergekit's max(1, ⌊density·D⌋) (all D at density 1)."""
    numel = stats.scope.numel
    return torch.tensor([numel if m.density >= 1.0 else min(numel, max(1, int(m.density * numel))) for m in model_params], dtype=torch.int64)


def tie_allowance_stage(model_params: list) -> Stage:
    """Counts, per block, the entries above and at the cut; leaves a `TieAllowance`: the ties each block
    keeps so that the scope keeps exactly k, the first ties in scope order. (A single-block scope does this
    in the components step.)"""

    def count(task_vectors: torch.Tensor, stats: Stats, block: Block) -> tuple:
        trim = stats.get(TrimCut)
        magnitude = task_vectors.abs()
        cut = trim.cut.to(task_vectors.device).unsqueeze(-1)
        return (block.name, block.index), count_rows(magnitude > cut).cpu(), count_rows(magnitude == cut).cpu()

    def finish(stats: Stats, parts: list) -> None:
        budget = _kept_counts(stats, model_params) - sum(above for _, above, _ in parts)
        allowance = TieAllowance()
        for key, _, equal in parts:
            take = torch.minimum(budget.clamp(min=0), equal)
            allowance.by_block[key] = take
            budget = budget - take
        stats.put(allowance)

    return Stage(count, finish, op="collect", whole=lambda task_vectors, stats, block: None)


def topk_threshold_stages(model_params: list) -> list[Stage]:
    """Stages leaving a `TrimCut`: per task, the smallest |τ_i| kept by top-k at each model's density."""

    def ranks(stats: Stats) -> torch.Tensor:
        numel = stats.scope.numel
        return (numel - _kept_counts(stats, model_params)).clamp(0, max(numel - 1, 0))

    def found(stats: Stats, cut: OrderStatistic) -> None:
        stats.put(TrimCut(cut.value, _kept_counts(stats, model_params) == 0, cut.values))

    return [*KthSmallest(lambda task_vectors, stats, block: task_vectors.abs(), ranks, found).stages(), tie_allowance_stage(model_params)]


def trim_topk(task_vectors: torch.Tensor, stats: Stats, block: Block | None = None, model_params: list | None = None) -> torch.Tensor:
    """A new tensor: τ with all but its task's k entries of largest magnitude zeroed (ties at the cut: the
    first ones in scope order, `TieAllowance`; in a single-block scope, counted here)."""
    trim = stats.get(TrimCut)
    magnitude, trim.magnitudes = trim.magnitudes, None  # |τ|, kept by the selection when this block is the scope
    if magnitude is None:
        magnitude = task_vectors.abs()
    cut = trim.cut.to(task_vectors.device).unsqueeze(-1)
    cut = torch.where(trim.keep_none.to(task_vectors.device).unsqueeze(-1), torch.inf, cut)
    tied = magnitude == cut  # (n, m)
    allowance = stats.find(TieAllowance)
    if allowance is not None and block is not None and (block.name, block.index) in allowance.by_block:
        allowed = allowance.by_block[(block.name, block.index)].to(task_vectors.device)
    elif model_params is not None:  # one block is the whole scope
        allowed = _kept_counts(stats, model_params).to(task_vectors.device) - count_rows(magnitude > cut)
    else:
        allowed = None
    keep = magnitude.ge_(cut)  # in place on |τ| (ours): 1.0 where kept
    if allowed is not None:
        if bool((count_rows(tied) > allowed).any()):
            zero_past_first_(keep, tied, allowed)  # ties past the allowance, in flat order
    return keep.mul_(task_vectors)


def sign_majority_stage(weighted_sparse: ReduceFn) -> Stage:
    """A stage leaving a `MajoritySign`: the sign of the sum of all elected signs over the scope.

    When the scope is a single block, the components step computes it from that block instead
    (`sign` is None), which saves a whole pass over every tensor that fits in one block.
    """

    def count(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return sign_balance(sum_rows(weighted_sparse(task_vectors, stats, block)))

    def finish(stats: Stats, sign_total: torch.Tensor) -> None:
        stats.put(MajoritySign(-1.0 if sign_total < 0 else 1.0))

    def from_the_block(task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        stats.put(MajoritySign(None))

    return Stage(count, finish, whole=from_the_block)


def elect_sign(weighted: torch.Tensor, majority: float | None) -> torch.Tensor:
    """Per entry, the sign of the sum over tasks (±1.0); the scope's majority sign where that sum is 0.

    sign(sign(total) ± ½) in float ops only: ~10× faster on CPU than a `torch.where` on a comparison.
    """
    total = sum_rows(weighted)
    if majority is None:  # this block is the whole scope
        majority = -1.0 if sign_balance(total) < 0 else 1.0
    return torch.sign(total).add_(0.5 if majority > 0 else -0.5).sign_()


def disjoint_components(weighted: torch.Tensor, weights: list[float], majority: float | None, normalize: bool) -> torch.Tensor:
    """w_i·sparse τ_i kept where its sign agrees with the elected one, over the weighted agreeing count.

    Works in place on `weighted`, which the caller hands over. Float ops only (comparisons and bool masks
    are several times slower on CPU): with s the elected sign, max(w_i·τ_i·s, 0) is |w_i·τ_i| where it
    agrees and 0 elsewhere; its sign marks the agreeing entries; times s again gives the kept entries.
    """
    sign = elect_sign(weighted, majority)
    agreeing = weighted.mul_(sign).clamp_(min=0.0)
    if normalize:
        divisor = torch.zeros_like(agreeing[0])
        for row, weight in zip(agreeing, weights):
            divisor.add_(torch.sign(row), alpha=weight)
        if min(weights) > 0:  # the divisor is 0 (where every component is 0) or at least the smallest weight
            divisor.clamp_(min=min(weights))
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
    components = agreeing.mul_(sign)
    if normalize:
        components.div_(divisor)
    return components


def ties_stages(params: TiesParams, model_params: list) -> list[Stage]:
    def weighted_trim(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return scale_rows_(trim_topk(task_vectors, stats, block, model_params), weights_of(model_params))

    stages = topk_threshold_stages(model_params)
    return [*stages, sign_majority_stage(weighted_trim)] if params.zero_sign == "majority" else stages


def ties_components(task_vectors: torch.Tensor, stats: Stats, params: TiesParams, model_params: list, block: Block) -> torch.Tensor:
    weights = weights_of(model_params)
    majority = stats.get(MajoritySign).sign if params.zero_sign == "majority" else 1.0
    return disjoint_components(scale_rows_(trim_topk(task_vectors, stats, block, model_params), weights), weights, majority, params.normalize)


def ties_exact(inputs: TensorInputs, params: TiesParams, model_params: list) -> torch.Tensor | Pending | None:
    """mergekit's order: each δ_i trimmed by `mergekit_ops.magnitude` (its argsort's choice among entries tied
    at the cut), then generalized task arithmetic with the sign consensus of Σ_i w_i·δ_i. None (the components
    form) for pcbmerge's own keys: per-model λ_i or `zero_sign: majority`."""
    lambda_ = shared_lambda(model_params)
    if lambda_ is None or params.zero_sign != "positive" or inputs.base is None:
        return None
    if not params.rescale:  # a trim that only masks: the same bits, chunk by chunk after the masks
        return masked_task_arithmetic(inputs, model_params, [m.density for m in model_params], normalize=params.normalize, lambda_=lambda_, consensus="sum")
    return exact_task_arithmetic(inputs, params, model_params, lambda delta, m, _: magnitude(delta, m.density, params.rescale), consensus=True)


# The trim is an order statistic over each whole tensor: `exact` sees it whole.
METHOD = MergeMethod(
    "ties",
    TiesParams,
    SparseModelParams,
    ties_components,
    ties_stages,
    exact=ties_exact,
    exact_blocks=False,
    components_refusal=lambda params: RESCALED if params.rescale else None,
)
