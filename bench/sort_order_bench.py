"""Benchmark of `pcbcore.sort_order` against torch's own sort: the sets of entries `torch.argsort` puts in
the top 20 % of bf16-derived task-vector magnitudes (mergekit's TIES trim) and in a middle window (its
breadcrumbs), on 4M and 16M entries, best of several runs each.

    .venv/bin/python bench/sort_order_bench.py
"""

from __future__ import annotations

import time

import torch

from pcbcore import sort_order


def _best_of(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    with open("/proc/loadavg") as f:
        print(f"loadavg before: {f.read().strip()}  torch threads: {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    for n in (4 << 20, 16 << 20):
        base = torch.randn(n, generator=gen).bfloat16()
        tuned = (base.float() + 0.01 * torch.randn(n, generator=gen)).bfloat16()
        w = (tuned - base).abs().float()
        k = int(0.2 * n)
        lo, hi = n - k - n // 100, n - n // 100
        ours = _best_of(lambda w=w, k=k: sort_order.top_k_mask(w, k))
        theirs = _best_of(lambda w=w, k=k: torch.argsort(w, descending=True)[:k], reps=3)
        middle = _best_of(lambda w=w, lo=lo, hi=hi: sort_order.middle_mask(w, lo, hi))
        print(
            f"n={n:>9} distinct={torch.unique(w).numel():>5} k=0.2n: top_k_mask {ours * 1e3:7.1f} ms, "
            f"middle_mask {middle * 1e3:7.1f} ms, torch.argsort {theirs * 1e3:7.1f} ms ({theirs / ours:.1f}x top_k_mask)"
        )
    with open("/proc/loadavg") as f:
        print(f"loadavg after: {f.read().strip()}")


if __name__ == "__main__":
    main()
