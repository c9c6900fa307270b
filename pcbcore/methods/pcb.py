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
  computed exactly while streaming: pass 1 takes the min and max of every τ_i ⊙ τ_j, pass 2 the sums
  of exponentials, passes 3–4 the drop threshold by radix select, pass 5 the components. Softmax is
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

from typing import Literal

import torch
from pydantic import Field

from pcbcore.methods.base import FrozenModel, Fraction, MergeMethod, ModelParams, Scope
from pcbcore.stats import Block, Stage, Stats, kth_smallest_stages, min_max_norm, row_max, row_min, row_sum64


class PcbParams(FrozenModel):
    ratio: Fraction = Field(0.1, description="kept fraction r of each task vector's entries")
    variant: Literal["paper", "release"] = Field("paper", description="the paper's formulas or the authors' released code")
    scope: Scope = Field("model", description="balance over the whole model (paper) or each tensor")
    clip_quantile: float = Field(1e-4, ge=0.0, lt=0.5, description="release variant: fraction a clipped from each end of |τ_i|")


# ---------------------------------------------------------------- paper variant


def _drop_rank(params: PcbParams):
    def ranks(stats: Stats) -> torch.Tensor:
        numel = int(stats["numel"])
        rank = min(int((1.0 - params.ratio) * numel), numel - 1)
        return torch.full((int(stats["n_models"]),), rank, dtype=torch.int64)

    return ranks


def paper_balance(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    """β_i = β_intra,i ⊙ β_inter,i for one block, from the scope's min/max and softmax normalisers."""
    n = task_vectors.shape[0]
    pair_lo, pair_hi = stats["pair_min"], stats["pair_max"]  # (n, n); the diagonal is τ_i ⊙ τ_i
    intra_num = torch.exp(n * (min_max_norm(task_vectors**2, pair_lo.diagonal(), pair_hi.diagonal()) - 1.0))
    intra = intra_num / stats["intra_z"].to(task_vectors.dtype).unsqueeze(-1)
    inter = torch.zeros_like(task_vectors)
    for i in range(n):
        products = task_vectors[i] * task_vectors  # (n, m): τ_i ⊙ τ_j for every j
        softmax_num = torch.exp(min_max_norm(products, pair_lo[i], pair_hi[i]) - 1.0)
        inter[i] = (softmax_num / stats["inter_z"][i].to(task_vectors.dtype).unsqueeze(-1)).sum(dim=0)
    return intra * inter


def _paper_stages(params: PcbParams, model_params: list) -> list[Stage]:
    def pair_extreme(reduce):
        def fn(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
            return torch.stack([reduce(task_vectors[i] * task_vectors) for i in range(task_vectors.shape[0])])

        return fn

    def intra_sum(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        n = task_vectors.shape[0]
        lo, hi = stats["pair_min"].diagonal(), stats["pair_max"].diagonal()
        return row_sum64(torch.exp(n * (min_max_norm(task_vectors**2, lo, hi) - 1.0)))

    def inter_sum(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        lo, hi = stats["pair_min"], stats["pair_max"]
        return torch.stack([row_sum64(torch.exp(min_max_norm(task_vectors[i] * task_vectors, lo[i], hi[i]) - 1.0)) for i in range(task_vectors.shape[0])])

    return [
        Stage({"pair_min": ("min", pair_extreme(row_min)), "pair_max": ("max", pair_extreme(row_max))}),
        Stage({"intra_z": ("sum", intra_sum), "inter_z": ("sum", inter_sum)}),
        *kth_smallest_stages("drop", lambda task_vectors, stats, block: paper_balance(task_vectors, stats), _drop_rank(params)),
    ]


def _paper_components(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    balance = paper_balance(task_vectors, stats)
    kept = torch.where(balance >= stats["drop"].to(balance.device).unsqueeze(-1), balance, torch.zeros_like(balance))
    total = kept.sum(dim=0)
    return torch.where(total > 0, kept * task_vectors / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(task_vectors))


# ---------------------------------------------------------------- release variant


def clip_magnitudes(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    """c_i: |τ_i| clipped to its [rank ⌊aD⌋, rank ⌊(1−a)D⌋−1] values, signs kept."""
    lo = stats["clip_lo"].to(task_vectors.device).unsqueeze(-1)
    hi = stats["clip_hi"].to(task_vectors.device).unsqueeze(-1)
    return torch.sign(task_vectors) * torch.minimum(torch.maximum(task_vectors.abs(), lo), hi)


def release_scores(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    n = task_vectors.shape[0]
    magnitude = clip_magnitudes(task_vectors, stats).abs()
    intra = torch.exp(n * (min_max_norm(magnitude, stats["clip_lo"], stats["clip_hi"]) ** 2 - 1.0))
    inter = torch.tanh(task_vectors * task_vectors.sum(dim=0, keepdim=True))
    return intra * inter


def _release_stages(params: PcbParams, model_params: list) -> list[Stage]:
    a = params.clip_quantile

    def clip_ranks(stats: Stats) -> torch.Tensor:
        numel, n = int(stats["numel"]), int(stats["n_models"])
        lo = min(int(a * numel), numel - 1)
        hi = min(max(int((1.0 - a) * numel) - 1, lo), numel - 1)
        return torch.tensor([lo] * n + [hi] * n, dtype=torch.int64)

    def split_clip(stats: Stats) -> None:
        both = stats.pop("clip")
        n = both.shape[0] // 2
        stats["clip_lo"], stats["clip_hi"] = both[:n], both[n:]

    def scores(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return release_scores(task_vectors, stats)

    clip_stages = kth_smallest_stages("clip", lambda task_vectors, stats, block: task_vectors.abs().repeat(2, 1), clip_ranks, then=split_clip)
    drop_stages = kth_smallest_stages("drop", scores, _drop_rank(params))
    drop_stages[0].reductions["score_max"] = ("max", lambda task_vectors, stats, block: row_max(scores(task_vectors, stats, block)))
    return [*clip_stages, *drop_stages]


def _release_components(task_vectors: torch.Tensor, stats: Stats) -> torch.Tensor:
    scores = release_scores(task_vectors, stats)
    floor = stats["drop"].to(scores.device)
    scale = min_max_norm(torch.maximum(scores, floor.unsqueeze(-1)), floor, stats["score_max"])
    return scale * clip_magnitudes(task_vectors, stats) / scale.sum(dim=0).clamp(min=1e-12)


# ---------------------------------------------------------------- the method


def pcb_stages(params: PcbParams, model_params: list) -> list[Stage]:
    return (_paper_stages if params.variant == "paper" else _release_stages)(params, model_params)


def pcb_components(task_vectors: torch.Tensor, stats: Stats, params: PcbParams, model_params: list, block: Block) -> torch.Tensor:
    return (_paper_components if params.variant == "paper" else _release_components)(task_vectors, stats)


METHOD = MergeMethod("pcb", PcbParams, ModelParams, pcb_components, pcb_stages)
