"""The subspace methods (TSV-M, Iso-C, Iso-CTS, CART), consensus masks and LiNeS layer scaling.

Each method is checked against a dense float64 reference written here from the papers' definitions, on tiny
tensors and on a whole tiny Llama merged from folders; the references take other routes where they can (the
polar factor through an eigendecomposition rather than an SVD), so the two implementations share no code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import pcbcore.executor as executor
from pcbcore.components import StoredComponents, compute_components
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_state_dicts, merge_to_folder

# ---------------------------------------------------------------- dense float64 references


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of a full-rank matrix: a (aᵀa)^{-1/2} (tall) or (a aᵀ)^{-1/2} a (wide)."""
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T
    w, q = torch.linalg.eigh(gram)
    inv_sqrt = q @ torch.diag(w.rsqrt()) @ q.T
    return a @ inv_sqrt if tall else inv_sqrt @ a


def truncated(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def tsv_reference(taus: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    n = len(taus)
    if taus[0].dim() != 2:
        return alpha * sum(taus) / n
    k = min(taus[0].shape) // n
    parts = [truncated(t, k) for t in taus]
    u = polar(torch.cat([p[0] for p in parts], 1))
    s = torch.cat([p[1] for p in parts])
    vh = polar(torch.cat([p[2] for p in parts], 0))
    return alpha * u @ torch.diag(s) @ vh


def iso_c_reference(taus: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    total = sum(taus)
    if total.dim() != 2:
        return alpha * total / len(taus)
    sigma = torch.linalg.svdvals(total).mean()
    return alpha * sigma * polar(total)


def iso_cts_reference(taus: list[torch.Tensor], alpha: float = 1.0, fraction: float = 0.8) -> torch.Tensor:
    n, total = len(taus), sum(taus)
    if total.dim() != 2:
        return alpha * total / n
    r = min(total.shape)
    specific = round((r - int(r * fraction)) / n) * n
    k, s_task = r - specific, specific // n
    uc, sc, vhc = truncated(total, k)
    parts = [truncated(t - uc @ uc.T @ t, s_task) for t in taus]
    u = polar(torch.cat([p[0] for p in parts] + [uc], 1))
    vh = polar(torch.cat([p[2] for p in parts] + [vhc], 0))
    sigma = torch.cat([p[1] for p in parts] + [sc]).mean()
    return alpha * sigma * u @ vh


def cart_reference(taus: list[torch.Tensor], alpha: float = 2.0, ratio: float = 0.12) -> torch.Tensor:
    mean = sum(taus) / len(taus)
    if mean.dim() != 2:
        return mean + alpha * sum(t - mean for t in taus)
    k = max(1, int(ratio * min(mean.shape)))
    low = [truncated(t - mean, k) for t in taus]
    return mean + alpha * sum(u @ torch.diag(s) @ vh for u, s, vh in low)


def consensus_reference(taus: list[torch.Tensor], multi_task: torch.Tensor, k: int = 2, mask_lambda: float = 0.4, alpha: float = 1.0) -> torch.Tensor:
    votes = sum((t.abs() > mask_lambda * (multi_task - t).abs()).double() for t in taus)
    return alpha * (votes >= k).double() * multi_task


REFERENCES = {"tsv": tsv_reference, "iso_c": iso_c_reference, "iso_cts": iso_cts_reference, "cart": cart_reference}


# ---------------------------------------------------------------- helpers


def tiny_tensors(n: int, seed: int = 0, shapes=None) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"model.layers.0.w": (6, 5), "model.layers.0.b": (5,), "model.layers.1.w": (5, 9), "model.embed_tokens.weight": (7, 4)}
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    tasks = [{name: base[name] + 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()} for _ in range(n)]
    return base, tasks


def merge(method: str, base: dict, tasks: list[dict], device: str = "cpu", lines=None, **parameters) -> dict:
    data = {"merge_method": method, "base_model": "base", "models": [{"model": f"m{i}"} for i in range(len(tasks))], "parameters": parameters}
    if lines is not None:
        data["lines"] = lines
    return {k: v.cpu() for k, v in merge_state_dicts(parse_merge_config(data), base, tasks, device=device).items()}


def task_vectors_of(base: dict, tasks: list[dict], name: str) -> list[torch.Tensor]:
    return [t[name].double() - base[name].double() for t in tasks]


def assert_matches(merged: dict, base: dict, tasks: list[dict], reference, **kwargs) -> None:
    for name in base:
        expected = base[name].double() + reference(task_vectors_of(base, tasks, name), **kwargs)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- each method against its reference


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_subspace_methods_match_the_dense_reference_on_tiny_tensors(method, device):
    base, tasks = tiny_tensors(3)
    assert_matches(merge(method, base, tasks, device), base, tasks, REFERENCES[method])


def test_the_scale_and_rank_parameters_are_the_papers(device):
    base, tasks = tiny_tensors(2, seed=3)
    assert_matches(merge("tsv", base, tasks, device, alpha=0.7), base, tasks, tsv_reference, alpha=0.7)
    assert_matches(merge("iso_c", base, tasks, device, alpha=1.3), base, tasks, iso_c_reference, alpha=1.3)
    assert_matches(merge("iso_cts", base, tasks, device, alpha=1.5, common_space_fraction=0.5), base, tasks, iso_cts_reference, alpha=1.5, fraction=0.5)
    assert_matches(merge("cart", base, tasks, device, alpha=1.0, rank_ratio=0.5), base, tasks, cart_reference, alpha=1.0, ratio=0.5)


def test_iso_cts_splits_the_rank_evenly_among_the_tasks():
    from pcbcore.methods.iso import split_rank

    assert split_rank(32, 3, 0.8) == (26, 2)  # ⌊25.6⌋ = 25 common; 7 left → round(7/3)·3 = 6; common 26
    assert split_rank(64, 4, 0.8) == (52, 3)
    assert split_rank(11, 2, 0.0) == (1, 5)  # round(5.5) = 6 per task would overshoot the rank


def test_consensus_keeps_entries_that_k_task_masks_agree_on(device):
    base = {"w": torch.zeros(4)}
    tasks = [{"w": torch.tensor([1.0, 0.1, -1.0, 2.0])}, {"w": torch.tensor([1.0, 2.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, -0.1, 0.2, 0.0])}]
    taus = [t["w"].double() for t in tasks]
    multi_task = sum(taus)  # [3, 2, 0.2, 2]
    expected = consensus_reference(taus, multi_task)
    # masks (λ_m = 0.4): entry 0 all three; entry 1 task 1 only (0.1 ≯ 0.4·1.9); entry 2 all three (1 > 0.4·1.2,
    # 1 > 0.4·0.8, 0.2 > 0); entry 3 task 0 only. k = 2 keeps entries 0 and 2.
    torch.testing.assert_close(expected, torch.tensor([3.0, 0.0, 0.2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(merge("consensus_ta", base, tasks, device)["w"].double(), expected)
    torch.testing.assert_close(merge("consensus_ta", base, tasks, device, k=0)["w"], merge("task_arithmetic", base, tasks, device)["w"])
    assert torch.equal(merge("consensus_ta", base, tasks, device, k=4)["w"], base["w"])


def test_consensus_ties_masks_the_ties_merge(device):
    base, tasks = tiny_tensors(3, seed=5)
    ties = merge("ties", base, tasks, device, density=0.5)
    torch.testing.assert_close(merge("consensus_ties", base, tasks, device, density=0.5, k=0), ties)
    out = merge("consensus_ties", base, tasks, device, density=0.5, alpha=0.8, mask_lambda=0.3)
    for name in base:
        expected = base[name].double() + consensus_reference(task_vectors_of(base, tasks, name), ties[name].double() - base[name].double(), 2, 0.3, 0.8)
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_consensus_streams_in_row_blocks(monkeypatch):
    base, tasks = tiny_tensors(3, seed=7, shapes={"w": (40, 8)})
    whole = merge("consensus_ta", base, tasks)
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 64)
    assert torch.equal(merge("consensus_ta", base, tasks)["w"], whole["w"])


def test_svd_methods_see_each_matrix_whole_however_small_the_blocks(monkeypatch):
    base, tasks = tiny_tensors(3, seed=8, shapes={"w": (40, 8)})
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 64)
    for method, reference in REFERENCES.items():
        assert_matches(merge(method, base, tasks), base, tasks, reference)


# ---------------------------------------------------------------- a whole tiny model, merged from folders


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def merge_folders(method: str, base_dir: Path, model_dirs: list[Path], out_dir: Path, lines=None, **parameters) -> dict:
    data = {"merge_method": method, "base_model": str(base_dir), "models": [{"model": str(m)} for m in model_dirs], "parameters": parameters}
    if lines is not None:
        data["lines"] = lines
    merge_to_folder(parse_merge_config(data), out_dir, device="cpu")
    return read_folder(out_dir)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_a_tiny_llama_merged_from_folders_matches_the_reference(method, tiny_zoo, tmp_path):
    base_dir, model_dirs = tiny_zoo
    base, tasks = read_folder(base_dir), [read_folder(m) for m in model_dirs]
    merged = merge_folders(method, base_dir, model_dirs, tmp_path / "out")
    assert set(merged) == set(base)
    assert_matches(merged, base, tasks, REFERENCES[method])


# ---------------------------------------------------------------- properties


shapes = st.tuples(st.integers(2, 7), st.integers(2, 7))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_one_task_gives_that_task_for_tsv_and_its_flattened_spectrum_for_iso_c(shape, seed):
    base, tasks = tiny_tensors(1, seed, {"w": shape})
    tau = tasks[0]["w"].double() - base["w"].double()
    torch.testing.assert_close(merge("tsv", base, tasks)["w"].double(), tasks[0]["w"].double(), rtol=1e-4, atol=1e-5)
    iso = merge("iso_c", base, tasks)["w"].double() - base["w"].double()
    singular = torch.linalg.svdvals(tau)
    torch.testing.assert_close(torch.linalg.svdvals(iso), torch.full_like(singular, float(singular.mean())), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(iso, singular.mean() * polar(tau), rtol=1e-3, atol=1e-5)  # same singular vectors


@settings(max_examples=20, deadline=None)
@given(shape=shapes, n=st.integers(2, 3), seed=st.integers(0, 2**16), method=st.sampled_from(["tsv", "iso_c", "iso_cts", "cart", "consensus_ta"]))
def test_the_order_of_the_tasks_does_not_matter(shape, n, seed, method):
    base, tasks = tiny_tensors(n, seed, {"w": shape, "b": (shape[1],)})
    forward, backward = merge(method, base, tasks), merge(method, base, tasks[::-1])
    for name in base:
        torch.testing.assert_close(forward[name], backward[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- LiNeS


LINES = {"alpha": 0.5, "beta": 0.3}
# three layers: 0 → α, 1 → α + β/2, 2 → α + β; outside the layers → α
LINES_SCALE = {"model.layers.0.w": 0.5, "model.layers.1.w": 0.65, "model.layers.2.w": 0.8, "model.embed_tokens.weight": 0.5}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv", "iso_c"])
def test_lines_scales_the_merged_task_vector_linearly_in_depth(method, device):
    base, tasks = tiny_tensors(
        2, seed=11, shapes={"model.layers.0.w": (4, 3), "model.layers.1.w": (4, 3), "model.layers.2.w": (3, 4), "model.embed_tokens.weight": (5, 3)}
    )
    plain, scaled = merge(method, base, tasks, device), merge(method, base, tasks, device, lines=LINES)
    for name, scale in LINES_SCALE.items():
        torch.testing.assert_close(scaled[name], base[name] + scale * (plain[name] - base[name]), rtol=1e-5, atol=1e-6)


def test_lines_reaches_the_stored_components_of_the_search(tiny_zoo, tmp_path):
    base_dir, model_dirs = tiny_zoo
    data = {"merge_method": "tsv", "base_model": str(base_dir), "models": [{"model": str(m)} for m in model_dirs], "lines": {"alpha": 0.4, "beta": 0.6}}
    config = parse_merge_config(data)
    merged = merge_folders("tsv", base_dir, model_dirs, tmp_path / "out", lines={"alpha": 0.4, "beta": 0.6})
    stored = StoredComponents(compute_components(config, tmp_path / "components", device="cpu"), device="cpu")
    for name, value in stored.state_dict([1.0] * len(model_dirs)).items():
        torch.testing.assert_close(value, merged[name], rtol=1e-5, atol=1e-6)
    assert config.describe()["lines"] == {"alpha": 0.4, "beta": 0.6}


def test_a_lines_block_is_checked_key_by_key():
    data = {"merge_method": "tsv", "base_model": "base", "models": [{"model": "a"}], "lines": {"alpha": 1.0, "beta": 0.0, "gamma": 0.1}}
    with pytest.raises(MergeInputError, match="lines.gamma"):
        parse_merge_config(data)
    with pytest.raises(MergeInputError, match="lines.beta"):
        parse_merge_config({**data, "lines": {"alpha": 1.0}})


def test_an_svd_that_does_not_converge_in_float32_is_done_in_float64(monkeypatch):
    """LAPACK's divide and conquer can fail on an ill-conditioned float32 matrix (Iso-CTS did at 477M): the
    decomposition is retried in float64 and returned in the input's dtype. The failure is injected into
    torch.linalg.svd for float32 input."""
    from pcbcore.methods import tsv

    real = torch.linalg.svd

    def fails_in_float32(a, full_matrices=True):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    for shape in ((30, 12), (12, 30)):
        a = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        u, s, vh = tsv.svd(a)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        assert torch.allclose(u @ torch.diag(s) @ vh, a, atol=1e-5)
