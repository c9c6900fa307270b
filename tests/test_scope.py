"""`scope: model` streamed block by block equals a dense reference over the flattened model.

The reference here is written independently from the SPEC's formulas, in float64, on the whole model
flattened into one vector; the engine streams blocks of a few dozen entries (BLOCK_ELEMENTS is shrunk so
every tensor is split) and never holds the flattened model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pcbcore.executor as executor
import pcbcore.selection as order_statistics
from pcbcore.checkpoint import CheckpointReader, TensorInfo
from pcbcore.config import parse_merge_config


def flatten(folder) -> tuple[list[str], torch.Tensor]:
    reader = CheckpointReader(folder)
    names = [n for n, i in reader.tensors.items() if i.dtype.is_floating_point]
    return names, torch.cat([reader.read(n).double().reshape(-1) for n in names])


def unflatten(names, folder, vector) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    out, start = {}, 0
    for n in names:
        info = reader.tensors[n]
        out[n] = vector[start : start + info.numel].reshape(info.shape)
        start += info.numel
    return out


def norm(x):
    lo, hi = x.min(), x.max()
    return torch.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def kth(x, rank):
    return torch.sort(x).values[min(rank, x.numel() - 1)]


def pcb_paper_dense(tv: torch.Tensor, r: float) -> torch.Tensor:
    n, d = tv.shape
    intra = torch.stack([torch.softmax(n * norm(tv[i] * tv[i]), 0) for i in range(n)])
    inter = torch.stack([sum(torch.softmax(norm(tv[i] * tv[j]), 0) for j in range(n)) for i in range(n)])
    beta = intra * inter
    kept = torch.stack([torch.where(beta[i] >= kth(beta[i], int((1 - r) * d)), beta[i], 0.0) for i in range(n)])
    total = kept.sum(0)
    return torch.where(total > 0, (kept * tv).sum(0) / torch.where(total > 0, total, 1.0), 0.0)


def pcb_release_dense(tv: torch.Tensor, r: float, a: float) -> torch.Tensor:
    n, d = tv.shape
    mags = tv.abs()
    clipped = []
    for i in range(n):
        lo, hi = kth(mags[i], int(a * d)), kth(mags[i], int((1 - a) * d) - 1)
        clipped.append(mags[i].clamp(lo, hi))
    clipped = torch.stack(clipped)
    intra = torch.exp(n * torch.stack([norm(c) for c in clipped]) ** 2)
    inter = torch.tanh(tv * tv.sum(0))
    scores = intra * inter
    scale = torch.stack([norm(s.clamp(min=kth(s, int((1 - r) * d)))) for s in scores])
    return (scale * torch.sign(tv) * clipped).sum(0) / scale.sum(0).clamp(min=1e-12)


def ties_dense(tv: torch.Tensor, density: float) -> torch.Tensor:
    n, d = tv.shape
    k = int(density * d)
    trimmed = torch.stack([torch.where(t.abs() >= kth(t.abs(), d - k), t, 0.0) for t in tv])
    elected = torch.sign(trimmed.sum(0))
    majority = 1.0 if torch.sign(elected.sum()) >= 0 else -1.0
    elected = torch.where(elected == 0, majority, elected)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(0).double()
    return (trimmed * agree).sum(0) / torch.where(count == 0, 1.0, count)


CASES = {
    "pcb-paper": ({"ratio": 0.2, "variant": "paper", "scope": "model"}, lambda tv: pcb_paper_dense(tv, 0.2)),
    "pcb-release": ({"ratio": 0.3, "variant": "release", "scope": "model", "clip_quantile": 0.01}, lambda tv: pcb_release_dense(tv, 0.3, 0.01)),
    "ties-model": ({"density": 0.2, "scope": "model"}, lambda tv: ties_dense(tv, 0.2)),
}


@pytest.mark.parametrize("selection", ["bracket", "bracket-runs", "radix"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_scope_streamed_equals_dense_flattened_reference(case, selection, tiny_zoo, tmp_path, monkeypatch, device):
    params, reference = CASES[case]
    base, models = tiny_zoo
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 96)  # every tensor is split into several blocks
    if selection == "radix":  # the bracket may hold nothing: every order statistic falls back to radix select
        monkeypatch.setattr(order_statistics, "MAX_HELD", 0)
    else:  # a sample far smaller than the scope, so the bracket is a real guess
        monkeypatch.setattr(executor, "SCOPE_SAMPLE", 64)
    if selection == "bracket-runs":  # matrices sampled as a large tensor is: from runs of adjacent rows
        monkeypatch.setattr(executor, "SMALL_TENSOR", 16)
        monkeypatch.setattr(executor, "SAMPLE_READS", 3)
    method = "pcb" if case.startswith("pcb") else "ties"
    config = parse_merge_config({"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models], "parameters": params})
    executor.merge_to_folder(config, tmp_path / "out", device=device)

    names, theta_pre = flatten(base)
    tv = torch.stack([flatten(m)[1] - theta_pre for m in models])
    expected = unflatten(names, base, theta_pre + reference(tv))
    merged = CheckpointReader(tmp_path / "out")
    for name in names:
        assert torch.allclose(merged.read(name).double(), expected[name], atol=2e-6, rtol=1e-5), name


def test_tensor_scope_differs_from_model_scope(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    outs = {}
    for scope in ("tensor", "model"):
        config = parse_merge_config(
            {"merge_method": "pcb", "base_model": str(base), "models": [{"model": str(m)} for m in models], "parameters": {"scope": scope}}
        )
        executor.merge_to_folder(config, tmp_path / scope, device="cpu")
        outs[scope] = CheckpointReader(tmp_path / scope)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(outs["tensor"].read(name), outs["model"].read(name))


@pytest.mark.parametrize("miss", [False, True])
def test_in_memory_selection_equals_kthvalue(monkeypatch, miss):
    """Rows long enough for the sampled bracket, full of ties (bf16 values), with ranks near both ends."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, order_statistics.SMALL_BLOCK * 2 + 17, generator=generator).to(torch.bfloat16).float()
    x[1] = x[1].abs()
    ranks = [0, int(0.8 * x.shape[1]), x.shape[1] - 1]
    if miss:  # bounds that exclude every rank: the fallback must still be exact
        monkeypatch.setattr(order_statistics, "bracket_bounds", lambda sample, ranks, numel: (torch.full((3,), 10.0), torch.full((3,), 11.0)))
    expected = torch.stack([torch.kthvalue(x[i], k + 1).values for i, k in enumerate(ranks)])
    assert torch.equal(order_statistics.select_in_memory(x, ranks), expected)


@pytest.mark.parametrize("shape,want", [((32000, 512), 1 << 18), ((7, 5), 20), ((100, 3), 1000), ((5, 4), 3)])
def test_sample_runs_are_disjoint_rows_holding_the_share(shape, want):
    info = TensorInfo("w", torch.float32, shape, Path("w.safetensors"))
    runs = executor.sample_runs(info, want, torch.Generator().manual_seed(0))
    row = info.numel // shape[0]
    assert len(runs) <= executor.SAMPLE_READS
    assert all(0 <= a < b <= shape[0] for a, b in runs)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(runs, runs[1:]))  # sorted, disjoint
    assert sum(b - a for a, b in runs) * row >= min(want, info.numel)
