"""Statistics over a merge *scope*, computed exactly while streaming.

A scope is the set of entries that a method's Norm, Softmax, top-k or quantile runs over: one tensor
(`scope: tensor`) or the whole model flattened into one vector (`scope: model`). The executor never holds
the flattened model; it walks the scope block by block, several times if needed. A method therefore
declares its statistics as `Stage`s of *decomposable* reductions (sum, min, max, histogram counts, or
per-block partials collected for `finish`):
each block contributes a partial result, partials are combined, and the stage's `finish` derives new
statistics from the totals before the next pass. Because the reductions are exact over any partition
of the scope, a streamed model-scope merge equals the dense flattened one.

Order statistics (the k-th smallest entry, as needed for top-k trimming and PCB's drop threshold) are
exact and usually take one pass: bounds taken from a sample of the scope's columns bracket the rank, the
pass counts the entries under the bracket and keeps the few inside it, and the k-th value is selected
among those. Where the bracket misses, a two-pass radix select on the float32 bit pattern finds it: the
first pass counts entries per value of the high 16 bits, which locates the bucket holding rank k; the
second counts the low 16 bits inside that bucket. No sort, any scope size (`torch.quantile` refuses more
than 16M entries; `torch.kthvalue` needs the whole vector and is ~3× slower than the bracket in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Block:
    """Where a block of task vectors comes from: tensor `name` (of `shape`), its `index`-th block, holding
    the rows [start, stop) along dim 0 (`rows`; None: the whole tensor)."""

    name: str
    index: int = 0
    shape: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None


def row_spans(shape: tuple[int, ...], entries: int) -> list[tuple[int, int]]:
    """A tensor of `shape` cut along dim 0 into runs of whole rows [start, stop), each holding at most
    `entries` entries (at least one row); a 0-d tensor is one row."""
    n_rows = shape[0] if shape else 1
    rows = max(1, entries // max(math.prod(shape[1:]), 1))
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


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
    # Runs before the pass (not before `whole`): e.g. to derive bounds from `stats['sample']`, a sample of
    # the scope's task-vector columns that the executor draws when a stage has a `start`.
    start: Callable[[Stats], None] | None = None
    # Whether the pass is needed at all, read once the previous stages have finished (None: always).
    needed: Callable[[Stats], bool] | None = None


def combine_partial(op: str, acc, part):
    if op == "collect":  # every block's partial kept, for `finish` to combine
        return [*(acc or []), part]
    if acc is None:
        return part
    if op == "sum":
        return acc + part
    if op == "min":
        return torch.minimum(acc, part)
    if op == "max":
        return torch.maximum(acc, part)
    if op == "minmax":  # partials (2, ...): minima, then maxima
        return torch.stack([torch.minimum(acc[0], part[0]), torch.maximum(acc[1], part[1])])
    raise ValueError(f"unknown reduction {op!r}")


def norm_map(lo: torch.Tensor, hi: torch.Tensor, top: bool = False, gain: float = 1.0) -> tuple[list[float], list[float]]:
    """Per row, (offset, factor) with (x − offset)·factor = gain·Norm(x), Norm(x) = (x − lo)/(hi − lo) and 0
    where hi = lo; with `top`, gain·(Norm(x) − 1) instead (offset hi; 0, not −gain, where hi = lo).

    Subtracting first makes Norm exactly 0 at lo (and Norm − 1 exactly 0 at hi). As Python floats, so
    that a hot loop applies them in place (`sub_`, `mul_`) with no broadcast tensors.
    """
    lo64, hi64 = lo.double().cpu(), hi.double().cpu()
    span = hi64 - lo64
    factor = torch.where(span > 0, gain / torch.where(span > 0, span, 1.0), 0.0)
    return (hi64 if top else lo64).tolist(), factor.tolist()


def apply_map_(x: torch.Tensor, offsets: list[float], factors: list[float]) -> torch.Tensor:
    """x[i] ← (x[i] − offsets[i])·factors[i] for every row, in place."""
    for i in range(x.shape[0]):
        x[i].sub_(offsets[i]).mul_(factors[i])
    return x


def count_rows(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a bool mask (rows, m), how many entries are true, as int64 (rows,).

    Row by row over a uint8 view with an int32 accumulator: ~10× faster on CPU than `mask.sum(dim=-1)`.
    """
    return torch.stack([row.view(torch.uint8).sum(dtype=torch.int32) for row in mask]).to(torch.int64)


def sign_balance(x: torch.Tensor) -> torch.Tensor:
    """Σ sign(x) over a block, exactly, as float64: float32 sums of ±1 are exact up to 2^24 entries (and far
    faster than float64 accumulation on CPU); longer blocks are summed in pieces of 2^24."""
    signs = torch.sign(x).reshape(-1)
    return sum((piece.sum().double() for piece in signs.split(1 << 24)), torch.zeros((), dtype=torch.float64, device=x.device))


def sum_rows(x: torch.Tensor) -> torch.Tensor:
    """x[0] + x[1] + … for a few rows (n, m) → (m,); a chain of adds beats a strided `sum(dim=0)`."""
    total = x[0].clone()
    for row in x[1:]:
        total += row
    return total


# ---------------------------------------------------------------- order statistics


# Entries per row of the sample that brackets a rank (see `kth_smallest_stages`).
SAMPLE_ENTRIES = 1 << 14
# Entries per row held between the bracket's bounds, over the whole scope, before giving up on the bracket.
MAX_HELD = 1 << 25
# A single block smaller than this is selected with `torch.kthvalue` directly.
SMALL_BLOCK = 1 << 17
# The `block` that a scope's column sample passes to a `values` function.
SAMPLE_BLOCK = Block("<sample>", 0)


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


def sample_columns(m: int, count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` column indices drawn from m with replacement, seeded (no result depends on them), or all m
    when that is fewer."""
    if m <= count:
        return torch.arange(m, device=device)
    return torch.randint(0, m, (count,), generator=generator or torch.Generator().manual_seed(0)).to(device)


def bracket_bounds(sample: torch.Tensor, ranks: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, values that very likely enclose the entry of ascending rank `ranks` among `numel` entries.

    `sample` (rows, s) holds values of the same rows drawn from the scope. The sample's rank of the wanted
    entry is about s·rank/numel with a binomial spread √(s·p(1−p)); the bounds sit six spreads (and at
    least 32 sample entries) either side. The bounds are only a guess: the caller counts what falls
    below and between them and falls back to a radix select when the rank is not between them.
    """
    s = sample.shape[-1]
    sample = sample.to(torch.float32)
    p = ranks.to(torch.float64).cpu() / max(numel, 1)
    centre = p * s
    spread = 6.0 * torch.sqrt(s * p * (1.0 - p)) + 32.0
    lo_at = (centre - spread).floor().to(torch.int64).tolist()
    hi_at = (centre + spread).ceil().to(torch.int64).tolist()

    def at(row: int, rank: int, beyond: float) -> float:  # two selections per row: ~2.5× faster than a sort
        return float(torch.kthvalue(sample[row], rank + 1).values) if 0 <= rank < s else beyond

    lo = torch.tensor([at(i, r, -torch.inf) for i, r in enumerate(lo_at)], dtype=torch.float32)
    hi = torch.tensor([at(i, r, torch.inf) for i, r in enumerate(hi_at)], dtype=torch.float32)
    return lo.to(sample.device), hi.to(sample.device)


def split_at_bounds(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (rows, m): how many entries lie under lo (int64, (rows,)), and the mask of those in [lo, hi]."""
    lo, hi = (b.to(x.device, x.dtype).unsqueeze(-1) for b in (lo, hi))
    at_least = x >= lo
    return x.shape[-1] - count_rows(at_least), at_least.logical_and_(x <= hi)


def select_in_memory(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Per row of x (rows, m), the value of ascending 0-based rank `ranks[row]`, exactly.

    Small rows use `torch.kthvalue`. Larger ones bracket the rank from a sample of columns, count the
    entries under the bracket, and run `kthvalue` on the few entries inside it only (about 2–3× faster
    than `kthvalue` on the whole row); a row whose rank the bracket misses falls back to `kthvalue`.
    """
    x = x.to(torch.float32)
    m = x.shape[-1]
    if m < SMALL_BLOCK:
        return torch.stack([torch.kthvalue(x[i], int(k) + 1).values for i, k in enumerate(ranks)])
    lo, hi = bracket_bounds(x[:, sample_columns(m, SAMPLE_ENTRIES, x.device)], torch.tensor(ranks), m)
    below, inside = split_at_bounds(x, lo, hi)
    below = below.tolist()
    out = []
    for i, k in enumerate(ranks):
        held = x[i][inside[i]]
        if below[i] <= k < below[i] + held.numel():
            out.append(torch.kthvalue(held, k - below[i] + 1).values)
        else:
            out.append(torch.kthvalue(x[i], int(k) + 1).values)
    return torch.stack(out)


def kth_smallest_stages(
    prefix: str, values: ReduceFn, ranks: Callable[[Stats], torch.Tensor], then: Callable[[Stats], None] | None = None, with_max: bool = False
) -> list[Stage]:
    """Stages that leave in `stats[prefix]` the per-row value of ascending 0-based rank `ranks(stats)`.

    `values(task_vectors, stats, block)` gives the (rows, m) float values whose order statistic is wanted;
    it must act on each column of the task vectors alone (so it can be evaluated on a sample of columns).
    `ranks` gives an int64 tensor (rows,) of ranks and is read after the previous stages have finished.
    `then` runs once the value is known. With `with_max`, the per-row maximum of the values is left in
    `stats[prefix + '/max']` too. When the scope is one block, its values are left in
    `stats[prefix + '/values']` for the components step (an earlier stage may have put them there first).

    One pass usually suffices: bounds from the scope's column sample (`stats['sample']`, drawn by the
    executor) bracket the rank; the pass counts the entries under the lower bound and keeps those between
    the bounds; the rank's value is then the right order statistic of the kept few. Where the bracket
    misses (or would hold more than MAX_HELD entries), two radix passes on the float32 bit pattern find it
    exactly: the first counts entries per value of the high 16 bits, which locates the bucket holding the
    rank; the second counts the low 16 bits inside that bucket. A scope of one block selects in memory.
    """
    bounds_key, held_key, filled_key, missed_key = f"{prefix}/bounds", f"{prefix}/held", f"{prefix}/filled", f"{prefix}/missed"
    hi_key, lo_key, bucket_key, rest_key = f"{prefix}/hi", f"{prefix}/lo", f"{prefix}/bucket", f"{prefix}/rest"

    def finish_with(stats: Stats, value: torch.Tensor) -> None:
        stats[prefix] = value
        if then is not None:
            then(stats)

    # -- the bracket pass

    def set_bounds(stats: Stats) -> None:
        sampled = values(stats["sample"], stats, SAMPLE_BLOCK)
        lo, hi = bracket_bounds(sampled, ranks(stats), int(stats["numel"]))
        stats[bounds_key] = (lo, hi)
        # Room for the entries inside the bracket, allocated once before the pass (twice the sample's share
        # inside, at most MAX_HELD per row): small tensors kept block after block would fragment the heap.
        share = ((sampled >= lo.unsqueeze(-1)) & (sampled <= hi.unsqueeze(-1))).float().mean(dim=-1).max()
        capacity = min(MAX_HELD, int(2 * float(share) * int(stats["numel"])) + 4096)
        stats[held_key] = torch.empty((sampled.shape[0], capacity), dtype=torch.float32, device=sampled.device)
        stats[filled_key] = [0] * sampled.shape[0]  # None once a row's bracket overflows: radix select for it

    def bracket(task_vectors: torch.Tensor, stats: Stats, block: Block):
        x = values(task_vectors, stats, block)
        below, inside = split_at_bounds(x, *stats[bounds_key])
        held, filled = stats[held_key], stats[filled_key]
        count = []
        for i in range(x.shape[0]):
            kept = x[i][inside[i]]  # boolean indexing: ~5× faster on CPU than masked_select
            count.append(kept.numel())
            if filled[i] is None or filled[i] + kept.numel() > held.shape[-1]:
                filled[i] = None
                continue
            held[i, filled[i] : filled[i] + kept.numel()] = kept
            filled[i] += kept.numel()
        return below, torch.tensor(count), x.amax(dim=-1) if with_max else None

    def resolve(stats: Stats) -> None:
        parts = stats.pop(f"{prefix}/bracket")
        held, filled = stats.pop(held_key), stats.pop(filled_key)
        stats.pop(bounds_key)
        if with_max:
            stats[f"{prefix}/max"] = torch.stack([p[2] for p in parts]).amax(dim=0)
        below = sum(p[0] for p in parts)
        found, missed = [], []
        for i, k in enumerate(ranks(stats).tolist()):
            r = k - int(below[i])
            if filled[i] is not None and 0 <= r < filled[i]:
                found.append(torch.kthvalue(held[i, : filled[i]], r + 1).values)
            else:
                found.append(torch.tensor(torch.nan, device=held.device))
                missed.append(i)
        value = torch.stack(found).to(torch.float32)
        if missed:
            stats[prefix], stats[missed_key] = value, torch.tensor(missed)
        else:
            finish_with(stats, value)

    def select_whole(task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        x = stats.get(f"{prefix}/values")  # an earlier stage may have computed them on its way
        if x is None:
            x = values(task_vectors, stats, block)
        stats[f"{prefix}/values"] = x  # the block's values, for a components step that wants them again
        if with_max:
            stats[f"{prefix}/max"] = x.amax(dim=-1)
        finish_with(stats, select_in_memory(x, ranks(stats).tolist()))

    # -- the radix fallback, only for rows the bracket missed

    def missed_any(stats: Stats) -> bool:
        return missed_key in stats

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
        exact = keys_to_values((stats.pop(bucket_key) << 16) | low)
        missed = stats.pop(missed_key).to(exact.device)
        value = stats.pop(prefix).to(exact.device)
        value[missed] = exact[missed]
        finish_with(stats, value)

    return [
        Stage({f"{prefix}/bracket": ("collect", bracket)}, resolve, whole=select_whole, replaces=frozenset({f"{prefix}/bracket"}), start=set_bounds),
        Stage({hi_key: ("sum", count_high)}, after_high, needed=missed_any),
        Stage({lo_key: ("sum", count_low)}, after_low, needed=missed_any),
    ]
