"""Statistics over a merge *scope*, computed exactly while streaming: blocks, stages and their results.

A scope is the set of entries that a method's Norm, Softmax, top-k or quantile runs over: one tensor
(`scope: tensor`) or the whole model flattened into one vector (`scope: model`). The executor never holds
the flattened model; it walks the scope block by block, several times if needed. A method therefore
declares its statistics as `Stage`s of *decomposable* reductions (sums, minima and maxima, histogram
counts, or per-block partials collected for `finish`): each block contributes a partial result, partials are
combined, and the stage's `finish` derives new statistics from the total before the next pass. Because
the reductions are exact over any partition of the scope, a streamed model-scope merge equals the dense
flattened one.

What the stages derive is kept in `Stats`, one small dataclass per kind of result, looked up by its type
(`stats.get(TrimCut)`): the components step reads exactly the results its stages produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

T = TypeVar("T")


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


@dataclass(frozen=True)
class ScopeFacts:
    """What is known of a scope before any pass."""

    numel: int  # entries per model over the whole scope (D)
    n_models: int
    # A sample of the scope's task-vector columns (n, s), drawn by the executor when a stage has a `start`
    # and the scope is more than one block (None otherwise, and once the stages have run).
    sample: torch.Tensor | None = None


class Stats:
    """The scope's facts and the results the stages derived, one per result type."""

    def __init__(self, scope: ScopeFacts):
        self.scope = scope
        self._results: dict[type, Any] = {}

    def put(self, result: Any) -> None:
        self._results[type(result)] = result

    def get(self, kind: type[T]) -> T:
        return self._results[kind]

    def find(self, kind: type[T]) -> T | None:
        """The result of type `kind`, or None when no stage produced one."""
        return self._results.get(kind)

    def setdefault(self, kind: type[T]) -> T:
        """The result of type `kind`, made empty (`kind()`) first when there is none: for results that a
        pass fills block by block."""
        found = self._results.get(kind)
        if found is None:
            found = self._results[kind] = kind()
        return found


# A reduction maps a block of task vectors (n, m), the statistics so far and the block's origin to a
# partial result.
ReduceFn = Callable[[torch.Tensor, Stats, Block], Any]
# How the blocks' partials combine: "collect" keeps every block's partial, in order, for `finish`.
Reduction = Literal["sum", "minmax", "collect"]


@dataclass
class Stage:
    """One pass over the scope: a reduction of every block, then `finish` to derive statistics from its
    total (`finish(stats, total)`)."""

    reduce: ReduceFn
    finish: Callable[[Stats, Any], None]
    op: Reduction = "sum"
    # Optional shortcut for a scope that is a single block: computes the same statistics from it directly
    # (e.g. `torch.kthvalue` instead of two histogram passes), in place of the reduction and `finish`.
    whole: Callable[[torch.Tensor, Stats, Block], None] | None = None
    # Runs before the pass (not before `whole`): e.g. to derive bounds from `stats.scope.sample`, which the
    # executor draws when a stage has a `start`.
    start: Callable[[Stats], None] | None = None
    # Whether the pass is needed at all, read once the previous stages have finished (None: always).
    needed: Callable[[Stats], bool] | None = None


def combine_partial(op: Reduction, acc, part):
    if op == "collect":  # every block's partial kept, for `finish` to combine
        return [*(acc or []), part]
    if acc is None:
        return part
    if op == "sum":
        return acc + part
    if op == "minmax":  # partials (2, ...): minima, then maxima
        return torch.stack([torch.minimum(acc[0], part[0]), torch.maximum(acc[1], part[1])])
    raise ValueError(f"unknown reduction {op!r}")
