"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).

Two variants, both over a scope that is the whole model by default (the paper flattens every merged
parameter into one vector of length D; `scope: tensor` balances each tensor on its own).

`variant: paper` — the formulas of the paper:
    Norm(x) = (x − min x)/(max x − min x) over the scope (0 where max = min)
    β_intra,i = Softmax(n · Norm(τ_i ⊙ τ_i))            self-balancing: how much entry d matters to task i
    β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j))            cross-balancing: agreement with every other task
    β_i = β_intra,i ⊙ β_inter,i; keep the entries with β_i ≥ sorted(β_i)[⌊(1−r)D⌋] (β̂_i = m_i ⊙ β_i)
    θ_m = θ_pre + Σ_i β̂_i ⊙ λ_i τ_i / Σ_i β̂_i           so C_i = β̂_i ⊙ τ_i / Σ_j β̂_j (0 where all drop)
  The softmax normalisers run over the whole scope, so they weigh whole tasks against each other: a
  task whose squared entries are spread evenly gets a larger denominator than a peaked one. They are
  computed exactly while streaming: pass 1 takes the min and max of every τ_i ⊙ τ_j (i ≤ j: the
  products are symmetric), pass 2 the sums of exponentials, pass 3 the drop threshold (a sampled bracket,
  `pcbcore.selection`; two radix passes more in the rare case it misses), pass 4 the components. Softmax is
  shift-invariant, so exponentials are taken of (x − max), which keeps e^{n·Norm} finite for any n.

`variant: release` — what the authors' released pcb-merging.py computes:
    clip |τ_i| between its values of ascending rank ⌊a·D⌋ and ⌊(1−a)D⌋ − 1 (a = `clip_quantile`),
    keeping signs: c_i. intra = exp(n · Norm(|c_i|)²) (no softmax denominator; min and max of |c_i| are
    the clip values). inter = tanh(τ_i ⊙ Σ_j τ_j) on the raw vectors — sign-aware: an entry pulling
    against the sum scores negative. score = intra ⊙ inter; clamp from below at its value of rank
    ⌊(1−r)D⌋, min-max normalise to [0, 1] (the threshold entry and all under it get 0): scale_i.
    C_i = scale_i ⊙ c_i / max(Σ_j scale_j, 1e-12). Scaling intra by a positive constant changes nothing
    after the min-max normalisation, so it is computed as exp(n·(Norm² − 1)) to stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from pcbcore.kernels import apply_map_, norm_map, sum_rows
from pcbcore.methods.base import Fraction, FrozenModel, MergeMethod, ModelParams, Scope
from pcbcore.selection import KthSmallest, OrderStatistic
from pcbcore.stages import Block, Stage, Stats


class PcbParams(FrozenModel):
    ratio: Fraction = Field(0.1, description="kept fraction r of each task vector's entries")
    variant: Literal["paper", "release"] = Field("paper", description="the paper's formulas or the authors' released code")
    scope: Scope = Field("model", description="balance over the whole model (paper) or each tensor")
    clip_quantile: float = Field(1e-4, ge=0.0, lt=0.5, description="release variant: fraction a clipped from each end of |τ_i|")


# ---------------------------------------------------------------- paper variant


@dataclass
class ProductNorms:
    """The Norm maps of the softmax numerators, from the scope's extremes of every τ_i ⊙ τ_j: per pair i ≤ j
    (β_inter), then per i (β_intra, gain n), the (offset, factor) of f·(x − max) (`norm_map(top=True)`)."""

    offsets: list[float]
    factors: list[float]


@dataclass
class SoftmaxNormalisers:
    """1/Z per softmax over the scope, in the order of `ProductNorms`: per pair i ≤ j, then per i."""

    inverse: list[float]


@dataclass
class BalanceCut:
    """Per task, the value of β_i at rank ⌊(1−r)D⌋ over the scope: the smallest β_i kept."""

    cut: torch.Tensor  # (n,) float32
    # β of the block (n, m) when it is the whole scope, for the components step to take (used once, in place).
    balance: torch.Tensor | None = None


def _drop_rank(params: PcbParams):
    def ranks(stats: Stats) -> torch.Tensor:
        numel = stats.scope.numel
        rank = min(int((1.0 - params.ratio) * numel), numel - 1)
        return torch.full((stats.scope.n_models,), rank, dtype=torch.int64)

    return ranks


def pairs(n: int) -> list[tuple[int, int]]:
    """The unordered pairs i ≤ j: τ_i ⊙ τ_j = τ_j ⊙ τ_i, so each product, its Norm and its softmax are shared."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def softmax_numerators(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    """(P + n, m): E_ij = exp(Norm(τ_i ⊙ τ_j) − 1) for every pair i ≤ j (the numerators of β_inter), then
    exp(n·(Norm(τ_i ⊙ τ_i) − 1)) for each i (those of β_intra).

    Softmax is shift-invariant, so the −1 (the largest Norm) only keeps every exponential ≤ 1 (and where a
    product is constant over the scope its softmax is uniform whatever the constant). Each row is one
    fused multiply-add, f·τ_i·τ_j − f·max with f = gain/(max − min) from the scope's extremes (computed
    once), and all exponentials are taken in one call.
    """
    n, m = task_vectors.shape
    wanted = pairs(n) + [(i, i) for i in range(n)]
    norms = stats.get(ProductNorms)
    out = torch.empty((len(wanted), m), dtype=task_vectors.dtype, device=task_vectors.device)
    for p, (i, j) in enumerate(wanted):
        offset, factor = norms.offsets[p], norms.factors[p]
        constant = torch.tensor(-offset * factor, dtype=task_vectors.dtype, device=task_vectors.device)
        torch.addcmul(constant, task_vectors[i], task_vectors[j], value=factor, out=out[p])
    return out.exp_()


def paper_balance(task_vectors: torch.Tensor, stats: Stats, numerators: torch.Tensor | None = None) -> torch.Tensor:
    """β_i = β_intra,i ⊙ β_inter,i for one block (n, m), from the scope's Norm maps and softmax normalisers
    (and the block's softmax numerators when already at hand)."""
    n = task_vectors.shape[0]
    if numerators is None:
        numerators = softmax_numerators(task_vectors, stats)
    index = {pair: p for p, pair in enumerate(pairs(n))}
    inverse = stats.get(SoftmaxNormalisers).inverse
    balance = torch.empty_like(task_vectors)
    for i in range(n):
        row, intra = balance[i], len(index) + i
        for j in range(n):
            p = index[(min(i, j), max(i, j))]
            weight = inverse[p] * inverse[intra]  # 1/Z_inter,ij · 1/Z_intra,i
            if j == 0:
                torch.mul(numerators[p], weight, out=row)
            else:
                row.add_(numerators[p], alpha=weight)
        row.mul_(numerators[intra])
    return balance


def _paper_stages(params: PcbParams, model_params: list) -> list[Stage]:
    def extremes(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        n, m = task_vectors.shape
        product = torch.empty(m, dtype=task_vectors.dtype, device=task_vectors.device)
        found = torch.empty((2, len(pairs(n))), dtype=task_vectors.dtype, device=task_vectors.device)
        for p, (i, j) in enumerate(pairs(n)):
            found[0, p], found[1, p] = torch.aminmax(torch.mul(task_vectors[i], task_vectors[j], out=product))
        return found

    def norm_maps(stats: Stats, pair_extremes: torch.Tensor) -> None:
        n = stats.scope.n_models
        lo, hi = pair_extremes
        diagonal = [p for p, (i, j) in enumerate(pairs(n)) if i == j]
        inter_offsets, inter_factors = norm_map(lo, hi, top=True)
        intra_offsets, intra_factors = norm_map(lo[diagonal], hi[diagonal], top=True, gain=float(n))
        stats.put(ProductNorms(inter_offsets + intra_offsets, inter_factors + intra_factors))

    def normalisers(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return softmax_numerators(task_vectors, stats).sum(dim=-1).double()  # float32 sums per block are cascaded

    def inverses(stats: Stats, softmax_z: torch.Tensor) -> None:
        stats.put(SoftmaxNormalisers((1.0 / softmax_z).tolist()))

    def balance_of_the_block(task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        # The block is the scope: its numerators give the normalisers and then β at once (kept for the drop).
        numerators = softmax_numerators(task_vectors, stats)
        inverses(stats, numerators.sum(dim=-1).double())
        drop.block_values = paper_balance(task_vectors, stats, numerators)

    def found(stats: Stats, cut: OrderStatistic) -> None:
        stats.put(BalanceCut(cut.value, cut.values))

    drop = KthSmallest(lambda task_vectors, stats, block: paper_balance(task_vectors, stats), _drop_rank(params), found)
    return [
        Stage(extremes, norm_maps, op="minmax"),
        Stage(normalisers, inverses, whole=balance_of_the_block),
        *drop.stages(),
    ]


def _paper_components(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    found = stats.get(BalanceCut)
    balance, found.balance = found.balance, None  # this block's β, kept by the selection when the block is the scope
    if balance is None:
        balance = paper_balance(task_vectors, stats)
    kept = balance.mul_(balance >= found.cut.to(balance.device).unsqueeze(-1))  # β̂ = m ⊙ β (β > 0)
    total = sum_rows(kept)
    total.masked_fill_(total == 0, 1.0)  # where every β̂ is 0 the components are 0 anyway
    return kept.mul_(task_vectors).div_(total)


# ---------------------------------------------------------------- release variant


@dataclass
class ClipBounds:
    """Per task, the values of |τ_i| at ranks ⌊aD⌋ and ⌊(1−a)D⌋−1 over the scope, and the Norm map between."""

    lo: torch.Tensor  # (n,) float32
    hi: torch.Tensor  # (n,) float32
    norm: tuple[list[float], list[float]]  # (offsets, factors) of Norm(|c_i|), from lo to hi


@dataclass
class ScoreScale:
    """Per task, the score at rank ⌊(1−r)D⌋ (the floor) and the Norm map from it to the top score."""

    floor: torch.Tensor  # (n,) float32
    norm: tuple[list[float], list[float]]
    # The block's scores (n, m) when it is the whole scope, for the components step to take (used once).
    scores: torch.Tensor | None = None


def clip_magnitudes(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    """|c_i|: |τ_i| clipped to its [rank ⌊aD⌋, rank ⌊(1−a)D⌋−1] values."""
    clip = stats.get(ClipBounds)
    lo = clip.lo.to(task_vectors.device).unsqueeze(-1)
    hi = clip.hi.to(task_vectors.device).unsqueeze(-1)
    return task_vectors.abs().clamp_(lo, hi)


def release_scores(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    n = task_vectors.shape[0]
    norm = apply_map_(clip_magnitudes(task_vectors, stats), *stats.get(ClipBounds).norm)  # Norm(|c_i|)
    intra = torch.addcmul(torch.tensor(-float(n), dtype=norm.dtype, device=norm.device), norm, norm, value=float(n)).exp_()
    inter = torch.mul(task_vectors, sum_rows(task_vectors)).tanh_()
    return intra.mul_(inter)


def _release_stages(params: PcbParams, model_params: list) -> list[Stage]:
    a = params.clip_quantile

    def clip_ranks(stats: Stats) -> torch.Tensor:
        numel, n = stats.scope.numel, stats.scope.n_models
        lo = min(int(a * numel), numel - 1)
        hi = min(max(int((1.0 - a) * numel) - 1, lo), numel - 1)
        return torch.tensor([lo] * n + [hi] * n, dtype=torch.int64)

    def split_clip(stats: Stats, both: OrderStatistic) -> None:
        n = both.value.shape[0] // 2
        lo, hi = both.value[:n], both.value[n:]
        stats.put(ClipBounds(lo, hi, norm_map(lo, hi)))

    def scores(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return release_scores(task_vectors, stats)

    def scale_map(stats: Stats, drop: OrderStatistic) -> None:
        stats.put(ScoreScale(drop.value, norm_map(drop.value, drop.max), drop.values))

    clip = KthSmallest(lambda task_vectors, stats, block: task_vectors.abs().repeat(2, 1), clip_ranks, split_clip)
    drop = KthSmallest(scores, _drop_rank(params), scale_map, with_max=True)
    return [*clip.stages(), *drop.stages()]


def _release_components(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    scale_of = stats.get(ScoreScale)
    scores, scale_of.scores = scale_of.scores, None
    if scores is None:
        scores = release_scores(task_vectors, stats)
    # scale_i = Norm(max(score_i, its drop value)): 0 at and under the threshold, 1 at the top score
    scale = apply_map_(torch.maximum(scores, scale_of.floor.to(scores.device).unsqueeze(-1)), *scale_of.norm)  # exactly 0 at the floor
    clipped = clip_magnitudes(task_vectors, stats).mul_(torch.sign(task_vectors))
    return clipped.mul_(scale).div_(sum_rows(scale).clamp_(min=1e-12))


# ---------------------------------------------------------------- the method


def pcb_stages(params: PcbParams, model_params: list) -> list[Stage]:
    return (_paper_stages if params.variant == "paper" else _release_stages)(params, model_params)


def pcb_components(task_vectors: torch.Tensor, stats: Stats, params: PcbParams, model_params: list, block: Block) -> torch.Tensor:
    return (_paper_components if params.variant == "paper" else _release_components)(task_vectors, stats)


METHOD = MergeMethod("pcb", PcbParams, ModelParams, pcb_components, pcb_stages)
