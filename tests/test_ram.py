"""RAM and RAM+ (mergekit's `ram`, `ramplus_tl`) on hand-computed tensors, in both forms."""

from __future__ import annotations

import pytest
import torch

from pcbcore.config import parse_merge_config
from pcbcore.executor import merge_state_dicts

BASE = torch.zeros(6)
# entry 0: only model a changed it; 1: a and b; 2: nobody (under ε); 3: all three; 4: only c; 5: b and c
TASKS = [
    torch.tensor([0.4, 0.2, 1e-7, 0.3, 0.0, 0.0]),
    torch.tensor([0.0, 0.6, 0.0, -0.3, 0.0, 0.2]),
    torch.tensor([0.0, 0.0, 0.0, 0.6, -0.5, 0.4]),
]


def merge(method: str, extra: dict | None = None, dtype: torch.dtype = torch.float32, **params) -> torch.Tensor:
    data = {"merge_method": method, "base_model": "b", "models": [{"model": f"m{i}"} for i in range(3)], "parameters": params, **(extra or {})}
    base = {"w": BASE.to(dtype)}
    return merge_state_dicts(parse_merge_config(data), base, [{"w": t.to(dtype)} for t in TASKS], device="cpu")["w"]


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones():
    expected = torch.tensor([0.4, 0.4, 0.0, 0.2, -0.5, 0.3])
    for extra in ({}, {"compute_dtype": "float32"}):
        assert torch.allclose(merge("ram", extra), expected, atol=1e-7)


def test_ramplus_scales_each_models_unique_changes_by_its_overlap():
    # a: 2 shared entries, 1 unique → ρ = 2 → λ = 1 + 0.1·min(2, 0.2) = 1.02; c: 2 shared, 1 unique → 1.02
    expected = torch.tensor([0.4 * 1.02, 0.4, 0.0, 0.2, -0.5 * 1.02, 0.3])
    for extra in ({}, {"compute_dtype": "float32"}):
        out = merge("ramplus_tl", extra)
        assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-7)
    # r and alpha: λ = 1 + 0.5·min(2, 1.0) = 1.5
    assert torch.allclose(merge("ramplus_tl", r=0.5, alpha=1.0)[[0, 4]], torch.tensor([0.6, -0.75]), atol=1e-7)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_in_bf16_follows_mergekits_dtypes(method):
    """mergekit's op order in bf16: RAM stays bf16; RAM+'s float32 gains make its result float32, as mergekit
    writes it when the file gives no out_dtype."""
    out = merge(method, {"dtype": "bfloat16"}, dtype=torch.bfloat16)
    assert out.dtype == (torch.bfloat16 if method == "ram" else torch.float32)
    assert torch.allclose(out.float(), merge(method), atol=4e-3)


def test_epsilon_decides_what_counts_as_changed():
    out = merge("ram", epsilon=0.25)  # only |τ| > 0.25 counts: entry 1 is then b's alone, entry 5 c's alone
    assert torch.allclose(out, torch.tensor([0.4, 0.6, 0.0, 0.2, -0.5, 0.4]), atol=1e-7)
