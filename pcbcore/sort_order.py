"""Which entries torch's unstable CPU sort puts in a position range, without sorting.

mergekit's TIES trim keeps ``torch.argsort(w, descending=True)[:k]`` and breadcrumbs keeps
``torch.sort(w).indices[lo:hi]``, both unstable (``stable=False``). Magnitudes of bf16-derived task vectors
hold many exactly equal values, so *which* of the entries equal to the cut value are kept depends on the sort
algorithm. On CPU, for a float32 tensor, torch (``aten/src/ATen/native/cpu/SortingKernel.cpp``,
``sort_kernel_impl``) runs ``std::sort`` from libstdc++ over a composite (value, index) iterator with a
comparator on the values only: ``KeyValueCompDesc`` is ``isnan(a) && !isnan(b) || a > b`` and
``KeyValueCompAsc`` is ``!isnan(a) && isnan(b) || a < b``. (The x86-simd-sort path in that file is not
compiled into the stock wheels — checked: torch 2.13.0+cpu reproduces a plain ``std::sort`` of
(float, int64) pairs exactly, index for index, up to 10^6 entries — and a tensor with stride 0 is not
sorted at all: its indices stay ``arange``.)

libstdc++'s ``std::sort`` (``bits/stl_algo.h``) is introsort:

* ``__introsort_loop(first, last, depth)``: while ``last - first > 16``: if ``depth == 0``, heapsort the
  segment and stop; else ``depth -= 1``, partition at ``cut``, recurse on ``[cut, last)``, loop on
  ``[first, cut)`` (both children get the decremented depth). The initial depth is ``2 * floor(log2 n)``.
* ``__unguarded_partition_pivot``: ``mid = first + (last - first) / 2``; ``__move_median_to_first`` swaps
  the median of ``first + 1, mid, last - 1`` into ``first``; then ``__unguarded_partition(first + 1, last,
  pivot=first)`` — a Hoare partition whose left scan stops on ``!(x < p)`` and right scan on ``!(p < x)``.
* ``__final_insertion_sort`` then insertion-sorts the whole array (guarded for the first 16 entries,
  unguarded after): a *stable* pass over the array the loop left behind.

Reasoning used here (ascending comparator ``<``; descending is the same on negated values, exactly):

* Partition. Let ``a_1 < a_2 < ...`` be the positions in ``[first + 1, last)`` holding ``x >= p`` and
  ``b_1 > b_2 > ...`` those holding ``x <= p``, both taken *after* the median swap. A scan only ever passes
  untouched entries or stops on a swapped one, so by induction the i-th left stop is ``a_i`` and the i-th
  right stop is ``b_i`` for as long as ``a_i < b_i``; those ``m`` pairs are swapped, in order, and the
  partition returns ``cut = min(a_{m+1}, b_m)`` (``a_{m+1}`` if ``m == 0``: the median of three guarantees
  an ``a_1``). Afterwards ``[first, cut)`` holds values ``<= p`` and ``[cut, last)`` values ``>= p``.
* Only segments straddling a boundary matter: a segment lying wholly inside or outside ``[start, stop)``
  keeps its set of entries whatever happens inside it later.
* Leaves (``<= 16`` entries) are weakly ordered relative to each other, so the final stable insertion sort
  equals a stable sort of each leaf on its own.
* Heapsort fallback (depth exhausted on a straddling segment): the segment ends up sorted, so if no run of
  equal values crosses a boundary inside it, its in-range entries are determined by value and any sort of
  the segment gives them. Otherwise the heap order of the ties would matter; that is not simulated, and the
  whole tensor is sorted with ``torch.sort`` instead (the reference itself). Median-of-three introsort
  reaches this only on adversarial inputs.

Each partition is a handful of vectorised passes over its segment; the segments followed halve in
expectation, so the expected cost is O(n) per boundary, versus torch's O(n log n) sequential sort.
NaN values are not simulated: a tensor holding NaN is sorted with ``torch.sort``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# libstdc++'s _S_threshold: the introsort loop leaves segments of at most this many entries to insertion sort.
THRESHOLD = 16


@dataclass
class SortStats:
    """What one simulation did (for tests and benchmarks)."""

    partitions: int = 0
    leaves: int = 0
    heap_segments: int = 0
    heap_ranges: list[tuple[int, int]] = field(default_factory=list)
    full_sort: bool = False
    segment_sizes: list[int] = field(default_factory=list)


def _median_position(keys: np.ndarray) -> int:
    """The position ``__move_median_to_first(first, first + 1, mid, last - 1)`` swaps into ``first``."""
    n = keys.shape[0]
    mid = n // 2
    a, b, c = keys[1], keys[mid], keys[n - 1]
    if a < b:
        if b < c:
            return mid
        if a < c:
            return n - 1
        return 1
    if a < c:
        return 1
    if b < c:
        return n - 1
    return mid


# Entries per chunk when counting stops: 255 eight-byte words, so no byte lane of a word sum overflows.
_CHUNK = 255 * 8


def _chunk_counts(flags: np.ndarray) -> np.ndarray:
    """Number of True entries in each consecutive ``_CHUNK`` of ``flags`` (the last chunk may be short)."""
    full = flags.shape[0] // _CHUNK
    lanes = flags[: full * _CHUNK].view(np.uint64).reshape(full, _CHUNK // 8).sum(axis=1)
    counts = lanes.view(np.uint8).reshape(full, 8).sum(axis=1, dtype=np.int64)
    if full * _CHUNK < flags.shape[0]:
        counts = np.append(counts, np.count_nonzero(flags[full * _CHUNK :]))
    return counts


def _nth_true(flags: np.ndarray, before: np.ndarray, j: int) -> int:
    """Position of the ``j``-th (0-based) True in ``flags``; ``before[c]`` counts the Trues ahead of chunk c."""
    c = int(np.searchsorted(before, j, side="right")) - 1
    return c * _CHUNK + int(np.flatnonzero(flags[c * _CHUNK : (c + 1) * _CHUNK])[j - before[c]])


def _partition(keys: np.ndarray, ge: np.ndarray, le: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``__unguarded_partition`` of a segment (> 16 entries, ascending ``<``) whose median swap is done.

    ``ge``/``le`` are scratch of at least ``len(keys) - 1`` entries. Returns ``cut`` and the positions
    ``a_1..a_m`` and ``b_1..b_m``, relative to ``keys[1:]``, whose entries the partition swaps pairwise (not
    done here: the caller applies whichever half each child needs)."""
    body = keys[1:]
    size = body.shape[0]
    ge, le = ge[:size], le[:size]
    np.greater_equal(body, keys[0], out=ge)  # left scan stops: !(x < p)
    np.less_equal(body, keys[0], out=le)  # right scan stops: !(p < x)
    # cA(x) = #ge in [0, x) rises, cB(x) = #le in [x, size) falls; a_i < b_i iff some x has cA(x) >= i <= cB(x),
    # so the number of swaps is m = max_x min(cA(x), cB(x)), found at the crossing of the two.
    ge_counts, le_counts = _chunk_counts(ge), _chunk_counts(le)
    ge_before = np.concatenate(([0], np.cumsum(ge_counts)))
    le_before = np.concatenate(([0], np.cumsum(le_counts)))
    total_ge, total_le = int(ge_before[-1]), int(le_before[-1])
    c = int(np.count_nonzero(ge_before <= total_le - le_before)) - 1
    if c + 1 < ge_before.shape[0]:
        lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, size)
        c_a = ge_before[c] + np.concatenate(([0], np.cumsum(ge[lo:hi])))
        c_b = total_le - le_before[c] - np.concatenate(([0], np.cumsum(le[lo:hi])))
        m = int(np.minimum(c_a, c_b).max())
    else:
        m = 0
    if m == 0:
        return _nth_true(ge, ge_before, 0) + 1, np.empty(0, np.int64), np.empty(0, np.int64)
    b_m = _nth_true(le, le_before, total_le - m)
    cut = min(_nth_true(ge, ge_before, m), b_m) if m < total_ge else b_m
    a_pos = np.flatnonzero(ge[:cut])
    b_pos = np.flatnonzero(le[b_m:])[::-1] + b_m
    return cut + 1, a_pos, b_pos


def _full_sort_mask(values: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    order = torch.sort(values, descending=descending, stable=False).indices
    mask[order[start:stop]] = True
    return mask


def sorted_range_mask(values: torch.Tensor, start: int, stop: int, descending: bool, stats: SortStats | None = None) -> torch.Tensor:
    """Boolean mask over ``values`` of the entries that ``torch.sort(values, descending=descending,
    stable=False)`` (CPU) places at positions ``[start, stop)``.

    ``values`` is a 1-D float32 CPU tensor (the sort reproduced is that of ``values`` itself, so pass the
    float32 tensor mergekit sorts). ``start``/``stop`` are clipped to ``[0, n]`` like a slice (no negative
    indices)."""
    if values.dim() != 1:
        raise ValueError(f"sorted_range_mask wants a 1-D tensor, got shape {tuple(values.shape)}")
    if values.dtype != torch.float32:
        raise ValueError(f"sorted_range_mask simulates torch's float32 sort, got {values.dtype}")
    if values.device.type != "cpu":
        raise ValueError("sorted_range_mask reproduces torch's CPU sort; values must be on the CPU")
    stats = stats if stats is not None else SortStats()
    n = values.numel()
    start, stop = max(0, min(start, n)), max(0, min(stop, n))
    mask = np.zeros(n, dtype=np.bool_)
    if start >= stop:
        return torch.from_numpy(mask)
    if start == 0 and stop == n:
        mask.fill(True)
        return torch.from_numpy(mask)
    if n > 1 and values.stride(0) == 0:
        # sort_kernel returns the filled-in arange for a zero-stride (expanded) tensor without sorting.
        mask[start:stop] = True
        return torch.from_numpy(mask)
    x = values.detach().numpy()
    if np.isnan(x).any():
        stats.full_sort = True
        return _full_sort_mask(values, start, stop, descending)
    # Negation maps the descending comparator ``a > b`` onto ``<`` exactly (and keeps -0.0 == 0.0).
    keys = np.negative(x) if descending else x.copy()
    ids = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    ge_scratch, le_scratch = np.empty(n, np.bool_), np.empty(n, np.bool_)
    bounds = (start, stop)
    depth0 = 2 * (n.bit_length() - 1)
    # Segments straddling a boundary: (offset, keys view, ids view, depth limit); the views are ours to permute.
    pending = [(0, keys, ids, depth0)]
    while pending:
        off, seg_keys, seg_ids, depth = pending.pop()
        size = seg_keys.shape[0]
        lo, hi = max(start, off) - off, min(stop, off + size) - off
        if size <= THRESHOLD:
            stats.leaves += 1
            order = np.argsort(seg_keys, kind="stable")
            mask[seg_ids[order[lo:hi]]] = True
            continue
        if depth == 0:
            stats.heap_segments += 1
            stats.heap_ranges.append((off, off + size))
            order = np.argsort(seg_keys, kind="stable")
            sorted_keys = seg_keys[order]
            if (0 < lo and sorted_keys[lo - 1] == sorted_keys[lo]) or (hi < size and sorted_keys[hi - 1] == sorted_keys[hi]):
                # The heapsort's order among ties decides; sort the whole tensor as torch does.
                stats.full_sort = True
                return _full_sort_mask(values, start, stop, descending)
            mask[seg_ids[order[lo:hi]]] = True
            continue
        stats.partitions += 1
        stats.segment_sizes.append(size)
        pos = _median_position(seg_keys)
        if pos:
            seg_keys[0], seg_keys[pos] = seg_keys[pos], seg_keys[0]
            seg_ids[0], seg_ids[pos] = seg_ids[pos], seg_ids[0]
        cut, a_pos, b_pos = _partition(seg_keys, ge_scratch, le_scratch)
        # Each child only needs its own half of the swaps (its slots get the other side's entries), and a
        # child wholly outside the range needs nothing. Gather every source before writing any slot.
        body_keys, body_ids = seg_keys[1:], seg_ids[1:]
        children = []
        for c_off, c_end, slots, sources in ((off, off + cut, a_pos, b_pos), (off + cut, off + size, b_pos, a_pos)):
            follow = any(c_off < b < c_end for b in bounds)
            inside = start <= c_off and c_end <= stop
            if follow or inside:
                moved_keys = body_keys[sources] if follow else None
                children.append((c_off, c_end, slots, moved_keys, body_ids[sources], follow))
        for c_off, c_end, slots, moved_keys, moved_ids, follow in children:
            body_ids[slots] = moved_ids
            c_ids = seg_ids[c_off - off : c_end - off]
            if follow:
                body_keys[slots] = moved_keys
                pending.append((c_off, seg_keys[c_off - off : c_end - off], c_ids, depth - 1))
            else:
                mask[c_ids] = True
    return torch.from_numpy(mask)


def sorted_range_indices(values: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """The original indices that ``torch.sort(values, descending=descending, stable=False)`` (CPU, 1-D
    float32) places at positions ``[start, stop)``, as an ascending int64 tensor (a set: not in sort order)."""
    return torch.nonzero(sorted_range_mask(values, start, stop, descending)).view(-1)


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of ``torch.argsort(magnitudes, descending=True)[:k]`` (mergekit's ``magnitude`` sparsify)."""
    return sorted_range_mask(magnitudes, 0, k, descending=True)


def middle_mask(magnitudes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of ``torch.sort(magnitudes, descending=False).indices[lo:hi]`` (mergekit's breadcrumbs)."""
    return sorted_range_mask(magnitudes, lo, hi, descending=False)
