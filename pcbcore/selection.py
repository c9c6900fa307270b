"""Order statistics over a scope, exact, in one streamed pass as a rule.

The k-th smallest entry (as needed for top-k trimming and PCB's drop threshold) usually takes one pass:
bounds taken from a sample of the scope's columns bracket the rank, the pass counts the entries under the
bracket and keeps the few inside it, and the k-th value is selected among those. Where the bracket misses,
a two-pass radix select on the float32 bit pattern finds it: the first pass counts entries per value of
the high 16 bits, which locates the bucket holding rank k; the second counts the low 16 bits inside that
bucket. No sort, any scope size (`torch.quantile` refuses more than 16M entries; `torch.kthvalue` needs
the whole vector and is ~3× slower than the bracket in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pcbcore.kernels import count_rows
from pcbcore.stages import Block, Stage, Stats

BUCKETS = 1 << 16
# Entries per row of the sample that brackets a rank (see `KthSmallest`).
SAMPLE_ENTRIES = 1 << 14
# Entries per row held between the bracket's bounds, over the whole scope, before giving up on the bracket.
MAX_HELD = 1 << 25
# A single block smaller than this is selected with `torch.kthvalue` directly.
SMALL_BLOCK = 1 << 17
# The `block` that a scope's column sample passes to a `values` function.
SAMPLE_BLOCK = Block("<sample>", 0)

# The (rows, m) float values of a block whose order statistic is wanted: (task vectors, stats, block).
ValuesFn = Callable[[torch.Tensor, Stats, Block], torch.Tensor]


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


@dataclass
class OrderStatistic:
    """What a `KthSmallest` found over its scope."""

    value: torch.Tensor  # (rows,) float32: per row, the value of the wanted rank
    max: torch.Tensor | None = None  # (rows,): per row, the largest value (with `with_max`)
    # (rows, m): the values themselves when the scope is one block, for a components step that wants them
    # again (None otherwise).
    values: torch.Tensor | None = None


class KthSmallest:
    """Stages that find, per row, the value of ascending 0-based rank `ranks(stats)` among `values` over
    the scope, then hand it to `then(stats, found)` (which keeps what its method needs in `stats`).

    `values(task_vectors, stats, block)` gives the (rows, m) float values whose order statistic is wanted;
    it must act on each column of the task vectors alone (so it can be evaluated on a sample of columns).
    `ranks` gives an int64 tensor (rows,) of ranks and is read after the previous stages have finished.
    With `with_max`, the per-row maximum of the values is found too. When the scope is one block, its
    values are handed over with the result (an earlier stage may have computed them first: `block_values`).

    One pass usually suffices: bounds from the scope's column sample (`stats.scope.sample`, drawn by the
    executor) bracket the rank; the pass counts the entries under the lower bound and keeps those between
    the bounds; the rank's value is then the right order statistic of the kept few. Where the bracket
    misses (or would hold more than MAX_HELD entries), two radix passes on the float32 bit pattern find it
    exactly: the first counts entries per value of the high 16 bits, which locates the bucket holding the
    rank; the second counts the low 16 bits inside that bucket. A scope of one block selects in memory.
    """

    def __init__(self, values: ValuesFn, ranks: Callable[[Stats], torch.Tensor], then: Callable[[Stats, OrderStatistic], None], with_max: bool = False):
        self.values, self.ranks, self.then, self.with_max = values, ranks, then, with_max
        # The single block's values, when an earlier stage computed them on its way.
        self.block_values: torch.Tensor | None = None
        # In-pass state of the bracket: its bounds, the entries held inside them (rows, capacity) and how
        # many each row holds (None once a row's bracket overflows: radix select for it).
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._held: torch.Tensor | None = None
        self._filled: list[int | None] = []
        # After the bracket: the value so far (NaN in the rows it missed), the maximum, the rows missed, and
        # in the radix passes the high-16-bit bucket of each row's rank and the rank inside it.
        self._value: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._missed: torch.Tensor | None = None
        self._bucket: torch.Tensor | None = None
        self._rest: torch.Tensor | None = None

    def stages(self) -> list[Stage]:
        return [
            Stage(self._bracket, self._resolve, op="collect", whole=self._select_whole, start=self._set_bounds),
            Stage(self._count_high, self._after_high, needed=self._missed_any),
            Stage(self._count_low, self._after_low, needed=self._missed_any),
        ]

    def _finish(self, stats: Stats, value: torch.Tensor, values: torch.Tensor | None = None) -> None:
        self.then(stats, OrderStatistic(value, self._max, values))

    # -- the bracket pass

    def _set_bounds(self, stats: Stats) -> None:
        scope = stats.scope
        sampled = self.values(scope.sample, stats, SAMPLE_BLOCK)
        lo, hi = bracket_bounds(sampled, self.ranks(stats), scope.numel)
        self._bounds = (lo, hi)
        # Room for the entries inside the bracket, allocated once before the pass (twice the sample's share
        # inside, at most MAX_HELD per row): small tensors kept block after block would fragment the heap.
        share = ((sampled >= lo.unsqueeze(-1)) & (sampled <= hi.unsqueeze(-1))).float().mean(dim=-1).max()
        capacity = min(MAX_HELD, int(2 * float(share) * scope.numel) + 4096)
        self._held = torch.empty((sampled.shape[0], capacity), dtype=torch.float32, device=sampled.device)
        self._filled = [0] * sampled.shape[0]

    def _bracket(self, task_vectors: torch.Tensor, stats: Stats, block: Block):
        x = self.values(task_vectors, stats, block)
        below, inside = split_at_bounds(x, *self._bounds)
        held, filled = self._held, self._filled
        count = []
        for i in range(x.shape[0]):
            kept = x[i][inside[i]]  # boolean indexing: ~5× faster on CPU than masked_select
            count.append(kept.numel())
            if filled[i] is None or filled[i] + kept.numel() > held.shape[-1]:
                filled[i] = None
                continue
            held[i, filled[i] : filled[i] + kept.numel()] = kept
            filled[i] += kept.numel()
        return below, torch.tensor(count), x.amax(dim=-1) if self.with_max else None

    def _resolve(self, stats: Stats, parts: list) -> None:
        held, filled = self._held, self._filled
        self._held, self._filled, self._bounds = None, [], None
        if self.with_max:
            self._max = torch.stack([p[2] for p in parts]).amax(dim=0)
        below = sum(p[0] for p in parts)
        found, missed = [], []
        for i, k in enumerate(self.ranks(stats).tolist()):
            r = k - int(below[i])
            if filled[i] is not None and 0 <= r < filled[i]:
                found.append(torch.kthvalue(held[i, : filled[i]], r + 1).values)
            else:
                found.append(torch.tensor(torch.nan, device=held.device))
                missed.append(i)
        value = torch.stack(found).to(torch.float32)
        if missed:
            self._value, self._missed = value, torch.tensor(missed)
        else:
            self._finish(stats, value)

    def _select_whole(self, task_vectors: torch.Tensor, stats: Stats, block: Block) -> None:
        x = self.block_values
        if x is None:
            x = self.values(task_vectors, stats, block)
        self.block_values = None
        if self.with_max:
            self._max = x.amax(dim=-1)
        self._finish(stats, select_in_memory(x, self.ranks(stats).tolist()), values=x)

    # -- the radix fallback, only for rows the bracket missed

    def _missed_any(self, stats: Stats) -> bool:
        return self._missed is not None

    def _count_high(self, task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        return _row_bincount(ordered_keys(self.values(task_vectors, stats, block)) >> 16)

    def _after_high(self, stats: Stats, counts: torch.Tensor) -> None:
        self._bucket, self._rest = _locate(counts, self.ranks(stats).to(counts.device))

    def _count_low(self, task_vectors: torch.Tensor, stats: Stats, block: Block) -> torch.Tensor:
        keys = ordered_keys(self.values(task_vectors, stats, block))
        inside = (keys >> 16) == self._bucket.unsqueeze(-1)
        return _row_bincount(keys & (BUCKETS - 1), inside)

    def _after_low(self, stats: Stats, counts: torch.Tensor) -> None:
        low, _ = _locate(counts, self._rest)
        exact = keys_to_values((self._bucket << 16) | low)
        missed = self._missed.to(exact.device)
        value = self._value.to(exact.device)
        value[missed] = exact[missed]
        self._value = self._missed = self._bucket = self._rest = None
        self._finish(stats, value)
