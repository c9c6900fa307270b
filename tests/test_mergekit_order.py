"""mergekit's task-arithmetic family merged in mergekit's own op order (`MergeMethod.exact`).

Each expected value is mergekit 0.1.5's `GeneralizedTaskArithmeticMerge.merge_group` and its sparsifiers written
out here, op by op in the working dtype, with mergekit's own torch calls for the trims (`argsort`, `sort`):
the engine must give it to the bit, in bfloat16 and in float32, ties at the trim cut and a base listed among
the models included. The random methods' keep masks are pcbmerge's (`uniform_draws`, seeded), drawn here
with mergekit's keep probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch

from pcbcore import executor
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_state_dicts
from pcbcore.methods import METHODS, mergekit_ops
from pcbcore.methods.base import Pending, TensorInputs
from pcbcore.methods.dare import uniform_draws
from pcbcore.methods.mergekit_ops import sort_range_mask
from pcbcore.stages import Block

DTYPES = [torch.float32, torch.bfloat16]


def zoo(dtype: torch.dtype, shape=(8, 12), n: int = 3, seed: int = 0):
    """A base and n fine-tunes whose task vectors hold few distinct magnitudes (multiples of 1/64), so that many
    entries tie at every trim cut, and one fine-tune equal to the base in a quarter of its entries."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    models = []
    for i in range(n):
        steps = torch.randint(-3, 4, shape, generator=gen).float() / 64
        if i == 0:
            steps[: shape[0] // 4] = 0.0
        models.append((base.float() + steps).to(dtype))
    return base, models


def merged(method: str, base, models, per_model: list[dict], listed_base: bool = False, **parameters) -> torch.Tensor:
    entries = [{"model": f"m{i}", "parameters": p} for i, p in enumerate(per_model)]
    states = [{"w": m} for m in models]
    if listed_base:  # mergekit leaves it out of the task vectors; so does the config (no state dict for it)
        entries.insert(1, {"model": "base", "parameters": {"weight": 5.0}})
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": parameters})
    assert config.exact
    return merge_state_dicts(config, {"w": base}, states, device="cpu")["w"]


# ---------------------------------------------------------------- mergekit, written out


def mergekit_merge(base, deltas, weights, consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor:
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=base.dtype).reshape(-1, *[1] * base.dim())
    stacked = stacked * w
    if consensus:
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)
        agrees = stacked.sign() == elected
        mixed = (stacked * agrees).sum(dim=0)
        divisor = (w * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def l1_rescaled(delta, mask):
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mergekit_magnitude(delta, density):
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def mergekit_outliers(delta, density, gamma, rescale):
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.sort(delta.abs().reshape(-1).float(), descending=False).indices[bottom : bottom + target]] = 1
    mask = mask.reshape_as(delta)
    return l1_rescaled(delta, mask) if rescale else delta * mask


def pcbmerge_draws(seed: int, index: int, shape) -> torch.Tensor:
    return uniform_draws(seed, index, Block("w", 0, tuple(shape))).reshape(shape)


def mergekit_bernoulli(delta, density, rescale, seed, index):
    if density >= 1:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    p = torch.full_like(delta, density, dtype=work)
    mask = (pcbmerge_draws(seed, index, delta.shape) < p).to(work)
    out = l1_rescaled(delta.to(work), mask) if rescale else delta.to(work) * mask
    return out.to(delta.dtype)


def mergekit_magprune(delta, density, epsilon, rescale, seed, index):
    if density >= 1:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = (pcbmerge_draws(seed, index, delta.shape).reshape(rows.shape) < probs).to(work)
    out = l1_rescaled(rows.to(work), mask) if rescale else rows.to(work) * mask
    return out.to(delta.dtype).reshape(delta.shape)


# ---------------------------------------------------------------- the methods


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("listed_base", [False, True], ids=["no-listed-base", "listed-base"])
def test_ties_is_mergekits_op_order_ties_at_the_cut_included(dtype, listed_base):
    base, models = zoo(dtype)
    per = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.55}, {"weight": 0.4, "density": 1.0}]
    deltas = [mergekit_magnitude(m - base, p["density"]) for m, p in zip(models, per)]
    cut = (models[0] - base).abs().reshape(-1).float().sort(descending=True).values
    k = int(0.3 * base.numel())
    assert cut[k - 1] == cut[k]  # a run of equal magnitudes straddles the cut: which are kept is the sort's choice
    expected = mergekit_merge(base, deltas, [p["weight"] for p in per], consensus=True, normalize=True, lambda_=0.9)
    out = merged("ties", base, models, per, listed_base=listed_base, **{"lambda": 0.9})
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_on_a_large_tensor_with_a_sort_past_insertion_sort(dtype):
    base, models = zoo(dtype, shape=(64, 80), n=2, seed=1)
    per = [{"weight": 1.0, "density": 0.2}, {"weight": 1.0, "density": 0.45}]
    deltas = [mergekit_magnitude(m - base, p["density"]) for m, p in zip(models, per)]
    expected = mergekit_merge(base, deltas, [1.0, 1.0], consensus=True, normalize=False, lambda_=1.0)
    assert torch.equal(merged("ties", base, models, per, normalize=False), expected)


def ties_config(n_models: int, per: dict):
    entries = [{"model": f"m{i}", "parameters": per} for i in range(n_models)]
    return parse_merge_config({"merge_method": "ties", "base_model": "base", "models": entries})


class CountedPending(Pending):
    made = 0

    def __init__(self, finish, threads):
        super().__init__(finish, threads)
        CountedPending.made += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_overlapped_across_tensors_is_each_tensors_mergekit_merge(dtype, monkeypatch):
    # Two sort threads even on a one-core machine, so each tensor's masks are still being found while the next
    # tensor is read (`Pending`); "b" is above the overlap limit, so it merges on its own between the others.
    monkeypatch.setattr(mergekit_ops, "_cores", lambda: 2)
    monkeypatch.setattr(mergekit_ops, "Pending", CountedPending)
    monkeypatch.setattr(executor, "OVERLAP_LIMIT", 900)
    shapes = {"a": (8, 12), "b": (40, 30), "c": (16, 16), "d": (5, 7), "e": (30, 20)}
    zoos = {name: zoo(dtype, shape=shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    per = {"weight": 1.0, "density": 0.3}
    threads, made = torch.get_num_threads(), CountedPending.made
    out = merge_state_dicts(
        ties_config(3, per), {name: z[0] for name, z in zoos.items()}, [{name: z[1][i] for name, z in zoos.items()} for i in range(3)], device="cpu"
    )
    assert CountedPending.made - made == len(shapes)  # every tensor's masks in the sort threads
    assert torch.get_num_threads() == threads  # torch's thread count is restored after the overlap
    for name, (base, models) in zoos.items():
        deltas = [mergekit_magnitude(m - base, per["density"]) for m in models]
        assert torch.equal(out[name], mergekit_merge(base, deltas, [1.0] * 3, consensus=True, normalize=True, lambda_=1.0)), name


def test_merges_overlapped_in_threads_of_one_process_restore_torchs_thread_count_when_the_last_ends():
    found = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        first, second = executor.TorchThreads(), executor.TorchThreads()
        first.lower(2)
        assert torch.get_num_threads() == 2
        second.lower(6)  # at least one thread stays
        assert torch.get_num_threads() == 1
        first.restore()  # the first to start ends first: the second still runs with its count
        assert torch.get_num_threads() == 1
        second.restore()
        assert torch.get_num_threads() == 4  # what the first found, not what the second found
        second.restore()  # a second restore (or one never lowered) changes nothing
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(found)


def test_an_overflow_in_an_overlapped_tensor_names_that_tensor(monkeypatch):
    monkeypatch.setattr(mergekit_ops, "_cores", lambda: 2)
    big = torch.finfo(torch.float32).max
    base = {"a": torch.zeros(6, 6), "b": torch.full((6, 6), -big), "c": torch.zeros(6, 6)}
    gen = torch.Generator().manual_seed(3)
    models = [{"a": torch.randn(6, 6, generator=gen), "b": torch.full((6, 6), big), "c": torch.randn(6, 6, generator=gen)} for _ in range(2)]
    threads = torch.get_num_threads()
    with pytest.raises(MergeInputError, match="tensor 'b' of model 'm0' differs from the base by more than float32 can hold"):
        merge_state_dicts(ties_config(2, {"density": 0.5}), base, models, device="cpu")
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("density", [0.05, 0.2, 0.37, 0.5, 0.999])
def test_one_model_ties_keeps_exactly_floor_density_times_numel(density):
    base = torch.zeros(40, 25)
    delta = torch.randint(1, 4, (40, 25), generator=torch.Generator().manual_seed(2)).float()  # magnitudes 1, 2, 3
    out = merged("ties", base, [delta], [{"density": density}])
    assert int((out != 0).sum()) == max(1, math.floor(density * base.numel()))
    assert torch.equal(out[out != 0], delta[out != 0])


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_is_mergekits_op_order(method, consensus, dtype, rescale):
    base, models = zoo(dtype, shape=(10, 12))
    per = [{"weight": 0.3, "density": 0.6, "gamma": 0.05}, {"weight": 0.7, "density": 0.8, "gamma": 0.1}, {"weight": 0.5, "density": 1.0}]
    deltas = [mergekit_outliers(m - base, p["density"], p.get("gamma", 0.01), rescale) for m, p in zip(models, per)]
    expected = mergekit_merge(base, deltas, [p["weight"] for p in per], consensus=consensus, normalize=True, lambda_=0.5)
    out = merged(method, base, models, per, listed_base=True, normalize=True, rescale=rescale, **{"lambda": 0.5})
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1.0, 0.53])
def test_dare_is_mergekits_op_order_with_pcbmerges_draws(method, consensus, dtype, density):
    base, models = zoo(dtype)
    per = [{"weight": 0.4, "density": density}, {"weight": 0.3, "density": density}, {"weight": 0.3, "density": 1.0}]
    # each model's index among the fine-tunes seeds its draws (the listed base is none of them)
    deltas = [mergekit_bernoulli(m - base, p["density"], True, 7, i) for i, (m, p) in enumerate(zip(models, per))]
    expected = mergekit_merge(base, deltas, [p["weight"] for p in per], consensus=consensus, normalize=False, lambda_=1.1)
    out = merged(method, base, models, per, listed_base=True, seed=7, **{"lambda": 1.1})
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("method,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1.0, 0.6])
def test_della_is_mergekits_op_order_with_pcbmerges_draws(method, consensus, normalize, dtype, density):
    base, models = zoo(dtype, shape=(6, 300))  # rows of 300: bfloat16 ranks round
    per = [{"weight": 1.0, "density": density, "epsilon": 0.2}, {"weight": 0.8, "density": 0.8, "epsilon": 0.1}, {"weight": 0.5, "density": density}]
    deltas = [mergekit_magprune(m - base, p["density"], p.get("epsilon", 0.15), True, 3, i) for i, (m, p) in enumerate(zip(models, per))]
    expected = mergekit_merge(base, deltas, [p["weight"] for p in per], consensus=consensus, normalize=normalize, lambda_=1.0)
    out = merged(method, base, models, per, seed=3)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_dare_keeps_about_density_and_restores_the_l1_norm():
    base, delta = torch.zeros(200, 200), torch.ones(200, 200)
    out = merged("dare_linear", base, [delta], [{"density": 0.3}], seed=1)
    kept = out != 0
    assert 0.29 < float(kept.float().mean()) < 0.31
    assert torch.allclose(out.abs().sum(), delta.abs().sum())  # mergekit's rescale: the L1 norm, not 1/density


def test_pcbmerges_own_keys_fall_back_to_the_components_form():
    base, models = zoo(torch.float32, n=2)
    inputs = TensorInputs("w", base, models, [False, False], base.dtype)
    for method, params, per in [
        ("ties", {}, [{"lambda": 0.5}, {"lambda": 1.0}]),  # per-model λ_i
        ("ties", {"zero_sign": "majority"}, [{}, {}]),
        ("dare_ties", {"zero_sign": "majority"}, [{}, {}]),
        ("breadcrumbs", {}, [{"lambda": 2.0}, {}]),
        ("della_linear", {}, [{"lambda": 2.0}, {}]),
    ]:
        m = METHODS[method]
        assert m.exact(inputs, m.params(**params), [m.model_params(**p) for p in per]) is None, (method, params)
    out = merged("ties", base, models, [{"lambda": 0.5, "density": 0.5}, {"density": 0.5}])  # merges, in the components form
    assert out.shape == base.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["sort_order", "order-statistics"])
def test_the_trim_sets_are_mergekits_argsort_sets_with_and_without_ties_at_a_boundary(dtype):
    gen = torch.Generator().manual_seed(5)
    for w in (torch.randint(0, 6, (3000,), generator=gen).to(dtype), torch.rand(3000, generator=gen, dtype=torch.float64).to(dtype)):
        for start, stop, descending in [(0, 700, True), (0, 1, True), (0, 3000, True), (120, 2900, False), (0, 1500, False), (2999, 3000, False)]:
            expected = torch.zeros(3000, dtype=torch.bool)
            expected[torch.argsort(w, descending=descending)[start:stop]] = True
            assert torch.equal(sort_range_mask(w, start, stop, descending), expected), (start, stop, descending)
