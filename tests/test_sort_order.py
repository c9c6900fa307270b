"""`pcbcore.sort_order` against torch's real unstable CPU sort.

Every case compares the simulated set of entries at sort positions [start, stop) with the set that
`torch.sort(values, descending=..., stable=False)` (and `torch.argsort`, which mergekit calls) really puts
there. The data is tie-heavy on purpose: with distinct values any correct top-k would pass, so a sanity test
checks that the tie order really differs from a stable sort's on these inputs (the tests can fail).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbcore.sort_order import SortStats, middle_mask, sorted_range_indices, sorted_range_mask, top_k_mask


def reference_mask(values: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    order = torch.sort(values, descending=descending, stable=False).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[start:stop]] = True
    return mask


def make(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "randint5":
        return torch.randint(0, 5, (n,), generator=gen).float()
    if kind == "bf16_abs":
        return torch.randn(n, generator=gen).bfloat16().float().abs()
    if kind == "bf16_delta":
        # The magnitude of a task vector between two bf16 checkpoints: what TIES/breadcrumbs sort.
        base = torch.randn(n, generator=gen).bfloat16()
        tuned = (base.float() + 0.01 * torch.randn(n, generator=gen)).bfloat16()
        return (tuned - base).abs().float()
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "sorted":
        return torch.randint(0, 7, (n,), generator=gen).float().sort().values
    if kind == "reversed":
        return torch.randint(0, 7, (n,), generator=gen).float().sort(descending=True).values
    if kind == "distinct":
        return torch.randn(n, generator=gen)
    if kind == "signed_zeros":
        # -0.0 and 0.0 compare equal in the comparator; a tie like any other.
        return torch.randint(-1, 2, (n,), generator=gen).float() * torch.tensor([0.0, -0.0, 1.0])[torch.randint(0, 3, (n,), generator=gen)]
    raise ValueError(kind)


KINDS = ["randint5", "bf16_abs", "bf16_delta", "equal", "sorted", "reversed", "distinct", "signed_zeros"]


def ranges(n: int) -> list[tuple[int, int]]:
    """Ranges at the start, in the middle and at the end, single entries, and the degenerate ones."""
    out = {
        (0, n // 5),
        (0, max(1, n // 2)),
        (n // 3, 2 * n // 3),
        (n - n // 4, n),
        (1, n - 1),
        (n // 2, n // 2 + 1),
        (0, n),
        (n // 2, n // 2),
        (n - 1, n),
        (0, 1),
    }
    return sorted((s, e) for s, e in out if 0 <= s <= e <= n)


def check(values: torch.Tensor, start: int, stop: int, descending: bool) -> None:
    got = sorted_range_mask(values, start, stop, descending)
    want = reference_mask(values, start, stop, descending)
    assert torch.equal(got, want), f"n={values.numel()} range=[{start}, {stop}) descending={descending}: {int((got != want).sum())} entries differ"


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_small_sizes(kind: str, descending: bool) -> None:
    for n in range(1, 41):
        values = make(kind, n, seed=n)
        for start, stop in ranges(n):
            check(values, start, stop, descending)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("n", [17, 100, 1000, 100_000])
@pytest.mark.parametrize("kind", KINDS)
def test_medium_sizes(kind: str, n: int, descending: bool) -> None:
    values = make(kind, n, seed=n + 7)
    for start, stop in ranges(n):
        check(values, start, stop, descending)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("kind", ["randint5", "bf16_abs", "bf16_delta", "equal"])
def test_large(kind: str, descending: bool) -> None:
    n = 10**6 + 3
    values = make(kind, n, seed=3)
    order = torch.sort(values, descending=descending, stable=False).indices
    for start, stop in [(0, n // 5), (n // 3, 2 * n // 3), (n - n // 10, n)]:
        want = torch.zeros(n, dtype=torch.bool)
        want[order[start:stop]] = True
        assert torch.equal(sorted_range_mask(values, start, stop, descending), want)


@settings(max_examples=400, deadline=None)
@given(
    data=st.lists(st.integers(0, 4), min_size=1, max_size=120),
    bounds=st.tuples(st.integers(0, 120), st.integers(0, 120)),
    descending=st.booleans(),
)
def test_hypothesis_ties(data: list[int], bounds: tuple[int, int], descending: bool) -> None:
    values = torch.tensor(data, dtype=torch.float32)
    start, stop = sorted(min(b, len(data)) for b in bounds)
    check(values, start, stop, descending)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.sampled_from([0.0, -0.0, 1e-3, 0.5, 0.5, 2.0, float("inf"), -float("inf"), -1.0]), min_size=1, max_size=300),
    fraction=st.floats(0, 1),
    width=st.floats(0, 1),
    descending=st.booleans(),
)
def test_hypothesis_special_values(data: list[float], fraction: float, width: float, descending: bool) -> None:
    values = torch.tensor(data, dtype=torch.float32)
    n = len(data)
    start = int(fraction * n)
    stop = min(n, start + int(width * n))
    check(values, start, stop, descending)


def test_ties_really_discriminate() -> None:
    """On the tie-heavy inputs the unstable order is not a stable sort's: a wrong tie rule would fail."""
    differing = 0
    for seed in range(5):
        values = make("bf16_delta", 100_000, seed)
        k = 20_000
        stable = torch.zeros(values.numel(), dtype=torch.bool)
        stable[torch.sort(values, descending=True, stable=True).indices[:k]] = True
        unstable = reference_mask(values, 0, k, True)
        differing += int((stable != unstable).sum())
        assert torch.equal(top_k_mask(values, k), unstable)
    assert differing > 0


def test_argsort_and_mergekit_expressions() -> None:
    """`top_k_mask` is mergekit's `argsort(w, descending=True)[:k]`, `middle_mask` its breadcrumbs slice."""
    for seed, n in enumerate([33, 1000, 50_001]):
        w = make("bf16_delta", n, seed)
        k = max(1, int(0.3 * n))
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.argsort(w, descending=True)[:k]] = True
        assert torch.equal(top_k_mask(w, k), want)
        n_top, target_n = int(0.01 * n), int(0.3 * n)
        n_bot = max(0, n - target_n - n_top)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(w, descending=False).indices[n_bot : n_bot + target_n]] = True
        assert torch.equal(middle_mask(w, n_bot, n_bot + target_n), want)
        idx = sorted_range_indices(w, 0, k, True)
        assert torch.equal(idx, torch.argsort(w, descending=True)[:k].sort().values)


def test_zero_stride_is_not_sorted() -> None:
    """torch returns arange for an expanded (stride-0) tensor without sorting it; so does the simulation."""
    values = torch.tensor([0.5]).expand(50)
    for start, stop in [(0, 10), (20, 45)]:
        assert torch.equal(sorted_range_mask(values, start, stop, True), reference_mask(values, start, stop, True))
        assert torch.equal(sorted_range_mask(values.contiguous(), start, stop, True), reference_mask(values.contiguous(), start, stop, True))


def test_non_contiguous_input() -> None:
    base = make("randint5", 2000, 1)
    values = base[::2]
    for start, stop in ranges(values.numel()):
        check(values, start, stop, True)


def test_nan_falls_back_to_torch() -> None:
    values = make("randint5", 500, 2)
    values[::7] = float("nan")
    stats = SortStats()
    for descending in (True, False):
        got = sorted_range_mask(values, 10, 200, descending, stats)
        assert torch.equal(got, reference_mask(values, 10, 200, descending))
    assert stats.full_sort


def test_rejects_other_inputs() -> None:
    with pytest.raises(ValueError):
        sorted_range_mask(torch.zeros(4, 4), 0, 3, True)
    with pytest.raises(ValueError):
        sorted_range_mask(torch.zeros(4, dtype=torch.float64), 0, 3, True)


def test_work_is_linear() -> None:
    """Only boundary-straddling segments are partitioned: total partitioned size stays a few times n."""
    values = make("bf16_delta", 200_000, 0)
    stats = SortStats()
    top_k_mask(values, 40_000)
    assert not stats.full_sort
    stats = SortStats()
    sorted_range_mask(values, 0, 40_000, True, stats)
    assert sum(stats.segment_sizes) < 8 * values.numel()
    assert stats.partitions < 4 * 2 * values.numel().bit_length()


def killer_input(n: int, ties: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """A median-of-three killer for libstdc++'s introsort (McIlroy's adversary, "A Killer Adversary for
    Quicksort", 1999), so the depth limit runs out and `std::sort` heapsorts a large segment.

    The adversary runs introsort's partitions with values decided lazily; entries never compared with each
    other stay "gas" and are given values at the end (distinct, or all equal for `ties`). Returns the input
    (ascending comparator) and the first segment introsort heapsorts."""
    gas = n
    val = [gas] * n
    state = {"solid": 0, "candidate": -1, "heap": None}

    def less(x: int, y: int) -> bool:
        if val[x] == gas and val[y] == gas:
            frozen = x if x == state["candidate"] else y
            val[frozen] = state["solid"]
            state["solid"] += 1
        if val[x] == gas:
            state["candidate"] = x
        elif val[y] == gas:
            state["candidate"] = y
        return val[x] < val[y]

    arr = list(range(n))

    def swap(i: int, j: int) -> None:
        arr[i], arr[j] = arr[j], arr[i]

    def median_to_first(result: int, a: int, b: int, c: int) -> None:
        if less(arr[a], arr[b]):
            if less(arr[b], arr[c]):
                swap(result, b)
            elif less(arr[a], arr[c]):
                swap(result, c)
            else:
                swap(result, a)
        elif less(arr[a], arr[c]):
            swap(result, a)
        elif less(arr[b], arr[c]):
            swap(result, c)
        else:
            swap(result, b)

    def partition(first: int, last: int, pivot: int) -> int:
        while True:
            while less(arr[first], arr[pivot]):
                first += 1
            last -= 1
            while less(arr[pivot], arr[last]):
                last -= 1
            if not first < last:
                return first
            swap(first, last)
            first += 1

    def loop(first: int, last: int, depth: int) -> None:
        while last - first > 16:
            if depth == 0:
                # std::sort heapsorts [first, last) here; the entries still gas get their values below.
                if state["heap"] is None:
                    state["heap"] = (first, last)
                return
            depth -= 1
            median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = partition(first + 1, last, first)
            loop(cut, last, depth)
            last = cut

    loop(0, n, 2 * (n.bit_length() - 1))
    for i in range(n):
        if val[i] == gas and not ties:
            val[i] = state["solid"]
            state["solid"] += 1
    assert state["heap"] is not None
    return torch.tensor(val, dtype=torch.float32), state["heap"]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("descending", [False, True])
def test_heapsort_fallback(ties: bool, descending: bool) -> None:
    """Where introsort's depth runs out on a straddling segment, the result still matches torch: by value
    when no tie crosses the boundary, else by sorting the whole tensor (reported in the stats)."""
    n = 3000
    values, (first, last) = killer_input(n, ties)
    if descending:
        values = -values
    assert last - first > 1000
    stats = SortStats()
    start, stop = first + (last - first) // 3, first + 2 * (last - first) // 3
    got = sorted_range_mask(values, start, stop, descending, stats)
    assert torch.equal(got, reference_mask(values, start, stop, descending))
    assert stats.heap_segments >= 1
    assert stats.heap_ranges[0] == (first, last)
    assert stats.full_sort == ties
