"""Statistics over a merge *scope*, computed exactly while streaming.

A scope is the set of entries that a method's Norm, Softmax, top-k or quantile runs over: one tensor
(`scope: tensor`) or the whole model flattened into one vector (`scope: model`). The executor never holds
the flattened model; it walks the scope block by block, several times if needed. A method therefore
declares its statistics as `Stage`s of *decomposable* reductions (sum, min, max, histogram counts):
each block contributes a partial result, partials are combined, and the stage's `finish` derives new
statistics from the totals before the next pass. Because the reductions are exact over any partition
of the scope, a streamed model-scope merge equals the dense flattened one.

Order statistics (the k-th smallest entry, as needed for top-k trimming and PCB's drop threshold) use a
two-pass radix select on the float32 bit pattern: the first pass counts entries per value of the high
16 bits, which locates the bucket holding rank k; the second pass counts the low 16 bits inside that
bucket, which pins down the exact value. Two passes, 65,536 counters per task, no sort, any scope size
(`torch.quantile` refuses more than 16M entries; `torch.kthvalue` needs the whole vector).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Block:
    """Where a block of task vectors comes from: tensor `name`, its `index`-th block of rows."""

    name: str
    index: int = 0


# A reduction maps a block of task vectors (n, m), the statistics so far and the block's origin to a
# partial result.
ReduceFn = Callable[[torch.Tensor, Stats, Block], torch.Tensor]

BUCKETS = 1 << 16


@dataclass
class Stage:
    """One pass over the scope: named reductions, then `finish` to derive statistics from their totals."""

    reductions: dict[str, tuple[str, ReduceFn]] = field(default_factory=dict)  # key -> (op, fn); op in sum|min|max
    finish: Callable[[Stats], None] | None = None
    # Optional shortcut for a scope that is a single block: computes the same statistics from it directly
    # (e.g. `torch.kthvalue` instead of two histogram passes), in place of `finish` and of the reductions
    # named in `replaces`; the stage's other reductions still run.
    whole: Callable[[torch.Tensor, Stats, Block], None] | None = None
    replaces: frozenset[str] = frozenset()


def combine_partial(op: str, acc: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    if acc is None:
        return part
    if op == "sum":
        return acc + part
    if op == "min":
        return torch.minimum(acc, part)
    if op == "max":
        return torch.maximum(acc, part)
    raise ValueError(f"unknown reduction {op!r}")


def row_min(x: torch.Tensor) -> torch.Tensor:
    return x.amin(dim=-1)


def row_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=-1)


def row_sum64(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums accumulated in float64, so a billion small terms add up to float32 accuracy."""
    return x.sum(dim=-1, dtype=torch.float64)


def min_max_norm(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x − lo) / (hi − lo) per row, defined as 0 where hi = lo. `lo`, `hi`: (rows,) broadcast over entries."""
    lo = lo.to(x.dtype).unsqueeze(-1)
    span = (hi.to(x.dtype).unsqueeze(-1) - lo)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))


# ---------------------------------------------------------------- order statistics (radix select)


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) whose integer order is the float order."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    # Non-negative floats: bit patterns already ascend; shift them above the negatives.
    # Negative floats: larger magnitude has a larger pattern, so reverse them.
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def keys_to_values(keys: torch.Tensor) -> torch.Tensor:
    keys = keys.to(torch.int64)
    bits = torch.where(keys >= (1 << 31), keys - (1 << 31), -1 - keys)
    return bits.to(torch.int32).view(torch.float32)


def _row_bincount(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of each value in [0, BUCKETS) per row. values: (rows, m) int64 → (rows, BUCKETS) int64."""
    rows = values.shape[0]
    offsets = torch.arange(rows, device=values.device, dtype=torch.int64).unsqueeze(-1) * BUCKETS
    flat = (values + offsets).reshape(-1)
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    return torch.bincount(flat, minlength=rows * BUCKETS).reshape(rows, BUCKETS)


def _locate(counts: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the bucket holding ascending rank `ranks` and the rank within that bucket."""
    cum = counts.cumsum(dim=-1)
    bucket = torch.searchsorted(cum, ranks.unsqueeze(-1), right=True).squeeze(-1)
    before = torch.where(bucket > 0, cum.gather(-1, (bucket - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.zeros_like(bucket))
    return bucket, ranks - before


def kth_smallest_stages(prefix: str, values: ReduceFn, ranks: Callable[[Stats], torch.Tensor], then: Callable[[Stats], None] | None = None) -> list[Stage]:
    """Two stages that leave in `stats[prefix]` the per-row value of ascending 0-based rank `ranks(stats)`.

    `values(task_vectors, stats, block)` gives the (rows, m) float values whose order statistic is wanted; `ranks`
    gives an int64 tensor (rows,) of ranks and is read after the previous stages have finished. `then`
    runs once the value is known.
    """
    hi_key, lo_key, bucket_key, rest_key = f"{prefix}/hi", f"{prefix}/lo", f"{prefix}/bucket", f"{prefix}/rest"

    def count_high(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return _row_bincount(ordered_keys(values(task_vectors, stats, block)) >> 16)

    def after_high(stats: Stats) -> None:
        counts = stats.pop(hi_key)
        bucket, rest = _locate(counts, ranks(stats).to(counts.device))
        stats[bucket_key], stats[rest_key] = bucket, rest

    def count_low(task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        keys = ordered_keys(values(task_vectors, stats, block))
        inside = (keys >> 16) == stats[bucket_key].unsqueeze(-1)
        return _row_bincount(keys & (BUCKETS - 1), inside)

    def after_low(stats: Stats) -> None:
        counts = stats.pop(lo_key)
        low, _ = _locate(counts, stats.pop(rest_key))
        stats[prefix] = keys_to_values((stats.pop(bucket_key) << 16) | low)
        if then is not None:
            then(stats)

    def select_directly(task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        x = values(task_vectors, stats, block).to(torch.float32)
        wanted = ranks(stats).tolist()
        stats[prefix] = torch.stack([torch.kthvalue(x[i], int(k) + 1).values for i, k in enumerate(wanted)])
        if then is not None:
            then(stats)

    def nothing_left(task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        pass

    return [
        Stage({hi_key: ("sum", count_high)}, after_high, whole=select_directly, replaces=frozenset({hi_key})),
        Stage({lo_key: ("sum", count_low)}, after_low, whole=nothing_left, replaces=frozenset({lo_key})),
    ]

