"""mergekit's other merge methods on tiny tensors, against values computed by hand, and their properties."""

from __future__ import annotations

import math

import pytest
import torch
from builders import random_models, run
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import pcbcore.executor as executor
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_state_dicts
from pcbcore.methods import METHODS
from pcbcore.methods.base import BaseWeights
from pcbcore.methods.breadcrumbs import rank_window
from pcbcore.methods.della import keep_probabilities
from pcbcore.methods.karcher import karcher_components
from pcbcore.stages import Block, ScopeFacts, Stats

R2 = math.sqrt(0.5)


def merge(method: str, tasks: list, base, device="cpu", models=None, **parameters) -> torch.Tensor:
    """The merged tensor 'w' of state dicts given as tensors (or lists) of 'w'."""
    base = {"w": torch.as_tensor(base, dtype=torch.float32)}
    tasks = [{"w": torch.as_tensor(t, dtype=torch.float32)} for t in tasks]
    entries = models or [{"model": f"m{i}"} for i in range(len(tasks))]
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": parameters})
    return merge_state_dicts(config, base, tasks, device=device)["w"].cpu()


def weighted(*weights: float) -> list[dict]:
    return [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]


def close(out: torch.Tensor, expected) -> bool:
    return torch.allclose(out, torch.as_tensor(expected, dtype=torch.float32), atol=1e-5)


# ---------------------------------------------------------------- slerp, nuslerp, multislerp, karcher


def test_slerp_follows_the_great_circle(device):
    # a ⊥ b: Ω = 90°, both coefficients sin 45° / sin 90° at t = ½
    assert close(merge("slerp", [[0.0, 1.0]], [1.0, 0.0], device, t=0.5), [R2, R2])
    # the norms are kept, not normalised away: a = [2, 0], b = [0, 1]
    assert close(merge("slerp", [[0.0, 1.0]], [2.0, 0.0], device, t=0.5), [2 * R2, R2])
    assert close(merge("slerp", [[0.0, 1.0]], [2.0, 0.0], device, t=0.0), [2.0, 0.0])
    assert close(merge("slerp", [[0.0, 1.0]], [2.0, 0.0], device, t=1.0), [0.0, 1.0])


def test_slerp_of_collinear_weights_is_the_straight_line(device):
    assert close(merge("slerp", [[2.0, 2.0]], [1.0, 1.0], device, t=0.25), [1.25, 1.25])


def test_slerp_and_nearswap_need_exactly_one_model_and_slerp_needs_t():
    with pytest.raises(MergeInputError, match="exactly one model besides the base"):
        merge("slerp", [[1.0], [2.0]], [0.0], t=0.5)
    with pytest.raises(MergeInputError, match="exactly one model besides the base"):
        merge("nearswap", [[1.0], [2.0]], [0.0], t=0.5)
    with pytest.raises(MergeInputError, match="parameters.t"):
        merge("slerp", [[1.0]], [0.0])


def test_nuslerp_interpolates_the_task_vectors_with_t_from_the_weights(device):
    base = [5.0, -1.0]
    out = merge("nuslerp", [[6.0, -1.0], [5.0, 0.0]], base, device, models=weighted(1.0, 3.0))  # τ1 = [1, 0], τ2 = [0, 1], t = ¾
    assert close(out, [5.0 + math.sin(math.pi / 8), -1.0 + math.sin(3 * math.pi / 8)])


def test_nuslerp_row_by_row_and_column_by_column(device):
    tasks = [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 2.0]]]
    base = torch.zeros(2, 2)
    # rows: row 0 is a right angle (t = ½); row 1 is collinear, so the straight line
    assert close(merge("nuslerp", tasks, base, device, nuslerp_flatten=False), [[R2, R2], [1.5, 1.5]])
    # columns: column 0 is [1, 1] and [0, 2], column 1 is [0, 1] and [1, 2]
    out = merge("nuslerp", tasks, base, device, nuslerp_flatten=False, nuslerp_row_wise=True)
    for column, (v0, v1) in enumerate([([1.0, 1.0], [0.0, 2.0]), ([0.0, 1.0], [1.0, 2.0])]):
        v0, v1 = torch.tensor(v0), torch.tensor(v1)
        theta = math.acos(float(v0 @ v1 / (v0.norm() * v1.norm())))
        expected = (math.sin(theta / 2) * v0 + math.sin(theta / 2) * v1) / math.sin(theta)
        assert close(out[:, column], expected)


def test_nuslerp_needs_two_models():
    with pytest.raises(MergeInputError, match="exactly two models"):
        merge("nuslerp", [[1.0]], [0.0])


def test_multislerp_is_the_normalised_weighted_mean_direction_at_the_mean_norm(device):
    # the tangent-space mean at the normalised weighted mean is zero, so the result is that direction
    assert close(merge("multislerp", [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], device), [R2, R2])
    assert close(merge("multislerp", [[2.0, 0.0], [0.0, 1.0]], [0.0, 0.0], device), [1.5 * R2, 1.5 * R2])
    direction = torch.tensor([0.75, 0.25]) / torch.tensor([0.75, 0.25]).norm()
    assert close(merge("multislerp", [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], device, models=weighted(3.0, 1.0)), direction)


def test_multislerp_of_one_model_is_that_model_and_antipodes_average_linearly(device):
    assert close(merge("multislerp", [[3.0, -4.0]], [1.0, 1.0], device), [3.0, -4.0])
    assert close(merge("multislerp", [[2.0, 0.0], [-2.0, 0.0]], [0.0, 0.0], device), [0.0, 0.0])
    with pytest.raises(MergeInputError, match="weighted mean of the task vectors of tensor 'w' is zero"):
        merge("multislerp", [[2.0, 0.0], [-2.0, 0.0], [0.0, 0.0]], [0.0, 0.0], models=weighted(1.0, 1.0, 1.0))


def test_karcher_counts_the_base_among_its_inputs(device):
    # base [0, 0] has no direction but counts in the mean norm: (1 + 1 + 0)/3 along the bisector
    assert close(merge("karcher", [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], device), [2 / 3 * R2, 2 / 3 * R2])


def test_karcher_leaves_out_a_listed_base():
    stats = Stats(ScopeFacts(2, 2))
    stats.put(BaseWeights(torch.zeros(2), listed=True))
    task_vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    components = karcher_components(task_vectors, stats, METHODS["karcher"].params(), [], Block("w", 0, (2,)))
    assert close(components.sum(dim=0), [R2, R2])


def test_karcher_mean_is_a_critical_point_of_the_squared_angles():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(50, generator=gen)
    tasks = [base + torch.randn(50, generator=gen) for _ in range(3)]
    out = merge("karcher", tasks, base, max_iter=100, tol=1e-7)
    mean = out / out.norm()
    tangent = torch.zeros(50)
    for point in [*tasks, base]:
        unit = point / point.norm()
        theta = torch.arccos((unit @ mean).clamp(-1, 1))
        tangent += theta / torch.sin(theta) * (unit - (unit @ mean) * mean) / 4
    assert tangent.norm() < 1e-4
    assert math.isclose(out.norm(), sum(p.norm() for p in [*tasks, base]) / 4, rel_tol=1e-5)


# ---------------------------------------------------------------- model_stock


def test_model_stock_ratio_from_the_angle_between_task_vectors(device):
    base = [1.0, 1.0]
    assert close(merge("model_stock", [[2.0, 1.0], [1.0, 2.0]], base, device), base)  # orthogonal: t = 0
    assert close(merge("model_stock", [[2.0, 1.0], [2.0, 1.0]], base, device), [2.0, 1.0])  # parallel: t = 1
    cos = R2  # τ1 = [1, 0], τ2 = [1, 1]: t = 2c/(1 + c), average [2, 1.5]
    t = 2 * cos / (1 + cos)
    assert close(merge("model_stock", [[2.0, 1.0], [2.0, 2.0]], base, device), [1 + t, 1 + 0.5 * t])
    # opposite task vectors: 1 + (N − 1)·cos θ = 0, no estimate, the base is kept
    assert close(merge("model_stock", [[2.0, 1.0], [0.0, 1.0]], base, device), base)


def test_model_stock_filter_wise_gives_each_row_its_ratio(device):
    tasks = [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]
    assert close(merge("model_stock", tasks, torch.zeros(2, 2), device, filter_wise=True), [[0.0, 0.0], [1.0, 0.0]])
    assert close(merge("model_stock", tasks, torch.zeros(2, 2), device), torch.tensor(tasks).mean(0) * (2 * 0.5 / 1.5))


def test_model_stock_of_three_averages_the_pairwise_cosines(device):
    tasks = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    cos = (0.0 + R2 + R2) / 3
    t = 3 * cos / (1 + 2 * cos)
    assert close(merge("model_stock", tasks, [0.0, 0.0], device), [t * 2 / 3, t * 2 / 3])


def test_model_stock_needs_two_models_and_ignores_weights():
    with pytest.raises(MergeInputError, match="at least two models"):
        merge("model_stock", [[1.0]], [0.0])
    tasks = [[2.0, 1.0], [2.0, 2.0]]
    assert torch.equal(merge("model_stock", tasks, [1.0, 1.0], models=weighted(5.0, 1.0)), merge("model_stock", tasks, [1.0, 1.0]))


# ---------------------------------------------------------------- breadcrumbs, della, sce


def test_rank_window_breaks_ties_by_position():
    assert rank_window(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2, 2).tolist() == [False, False, True, True]
    assert rank_window(torch.tensor([2.0, 1.0, 2.0, 1.0, 3.0]), 1, 3).tolist() == [True, False, True, True, False]
    assert rank_window(torch.tensor([5.0, 1.0]), 0, 0).tolist() == [False, False]


def test_breadcrumbs_drops_the_largest_and_the_smallest(device):
    tau = torch.arange(1.0, 11.0)  # density ½ keeps 5, γ = 0.1 drops 1 outlier: ascending ranks 4 … 8
    expected = torch.where((tau >= 5) & (tau <= 9), tau, 0.0)
    assert close(merge("breadcrumbs", [tau], torch.zeros(10), device, density=0.5, gamma=0.1), expected)
    assert close(merge("breadcrumbs", [tau], torch.zeros(10), device, density=0.5, gamma=0.1, rescale=True), expected * 55 / 35)
    assert close(merge("breadcrumbs", [tau], torch.zeros(10), device, density=1.0, gamma=0.5), tau)  # density 1: nothing dropped


def test_breadcrumbs_ties_elects_signs_as_mergekit(device):
    tasks = [[1.0, -2.0, 1.0], [-3.0, 1.0, -1.0]]  # sums [−2, −1, 0]: elected [−, −, +] (+ at an exact zero)
    assert close(merge("breadcrumbs_ties", tasks, [0.0] * 3, device), [-3.0, -2.0, 1.0])
    # weights 2 and 1, normalized: weighted [2, −4, 2], [−3, 1, −1]; divisors [1, 2, 2]
    assert close(merge("breadcrumbs_ties", tasks, [0.0] * 3, device, models=weighted(2.0, 1.0), normalize=True), [-3.0, -2.0, 1.0])
    assert close(merge("breadcrumbs", tasks, [0.0] * 3, device, models=weighted(2.0, 1.0), normalize=True), [-1 / 3, -1.0, 1 / 3])


def test_della_keep_probability_rises_with_rank_within_each_row():
    p = keep_probabilities(torch.tensor([3.0, 1.0, 2.0]), (3,), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.6, 0.4, 0.5]))
    p = keep_probabilities(torch.tensor([3.0, 1.0, 2.0, 1.0, 2.0, 3.0]), (2, 3), 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([0.7, 0.3, 0.5, 0.3, 0.5, 0.7]))


def test_della_keeps_density_on_average_and_restores_the_l1_norm(device):
    n = 40_000
    out = merge("della_linear", [torch.ones(n)], torch.zeros(n), device, density=0.5, epsilon=0.2, seed=3)
    kept = out != 0
    assert 0.48 < kept.float().mean() < 0.52
    assert torch.allclose(out[kept], torch.full((int(kept.sum()),), n / int(kept.sum())))  # L1 norm back to n
    # mergekit's order ranks equal magnitudes as its unstable argsort leaves them, so each entry's probability is
    # mergekit's; the components form (float32 maths) ranks them by position: the last quarter is kept more often
    # (p ≈ 0.65) than the first (≈ 0.35)
    data = {"merge_method": "della_linear", "base_model": "base", "models": [{"model": "m0"}], "compute_dtype": "float32"}
    data["parameters"] = {"density": 0.5, "epsilon": 0.2, "seed": 3}
    precise = merge_state_dicts(parse_merge_config(data), {"w": torch.zeros(n)}, [{"w": torch.ones(n)}], device=device)["w"].cpu() != 0
    assert precise[: n // 4].float().mean() < 0.4 < 0.6 < precise[-n // 4 :].float().mean()
    again = merge("della_linear", [torch.ones(n)], torch.zeros(n), device, density=0.5, epsilon=0.2, seed=3)
    other = merge("della_linear", [torch.ones(n)], torch.zeros(n), device, density=0.5, epsilon=0.2, seed=4)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_della_at_density_one_is_ties_without_trim_and_task_arithmetic(device):
    tasks, base = [[1.0, -2.0, 1.0], [-3.0, 1.0, -1.0]], [0.0] * 3
    assert close(merge("della", tasks, base, device), [-3.0, -2.0, 1.0])
    assert close(merge("della_linear", tasks, base, device), merge("task_arithmetic", tasks, base, device))


def test_della_refuses_probabilities_outside_zero_one():
    with pytest.raises(MergeInputError, match="epsilon must leave density ± epsilon inside"):
        merge("della", [[1.0]], [0.0], density=0.9, epsilon=0.15)


def test_sce_weights_by_mean_square_and_erases_disagreeing_signs(device):
    tasks = [[1.0, 2.0, 0.0, -1.0], [3.0, -2.0, 2.0, 1.0]]  # η = [1.5, 4.5]/6; sums [4, 0, 2, 0]: all +
    assert close(merge("sce", tasks, [0.0] * 4, device), [2.5, 2.0, 2.0, 1.0])


def test_sce_selects_the_entries_of_largest_variance(device):
    # variances [1, 4, 1, 1]: the top 2 are entry 1 and, of the three tied at 1, the last one (entry 3)
    tasks = [[1.0, 2.0, 0.0, -1.0], [3.0, -2.0, 2.0, 1.0]]
    assert close(merge("sce", tasks, [0.0] * 4, device, select_topk=0.5), [0.0, 2.0, 0.0, 1.0])


# ---------------------------------------------------------------- nearswap, arcee_fusion


def test_nearswap_swaps_near_entries_and_steps_t_towards_far_ones(device):
    out = merge("nearswap", [[1.05, 0.5, 2.0, 1.0]], [1.0, 1.0, 1.0, 1.0], device, t=0.1)
    assert close(out, [1.05, 0.9, 1.1, 1.0])


def test_nearswap_streams_in_blocks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    base, task = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    whole = merge("nearswap", [base + task], base, t=0.3)
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 6)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 6)
    assert torch.equal(merge("nearswap", [base + task], base, t=0.3), whole)


def test_arcee_fusion_keeps_only_the_outlying_changes(device):
    # importance ∝ |τ| (one row, one KL): quartiles at sorted indices 1, 2, 3 → 0.3 + 1.5·(0.4 − 0.2) = 0.6
    out = merge("arcee_fusion", [[0.1, -0.2, 0.3, -0.4, 10.0]], [0.0] * 5, device)
    assert close(out, [0.0, 0.0, 0.0, 0.0, 10.0])


def test_arcee_fusion_weighs_rows_by_their_divergence(device):
    # row 0 shifts every entry by 1, which leaves its softmax (KL 0) and so its importance at 0; row 1's
    # importances are KL·[0.1, 0.2, 0.25, 5]: quartiles at sorted indices 1, 3, 5 → 0 + 1.5·(0.2·KL − 0)
    base = torch.zeros(2, 4)
    task = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.25, 5.0]])
    assert close(merge("arcee_fusion", [base + task], base, device), [[0.0] * 4, [0.0, 0.0, 0.0, 5.0]])


# ---------------------------------------------------------------- properties

ALL_METHODS = [
    ("slerp", {"t": 0.3}, 1),
    ("nuslerp", {}, 2),
    ("nuslerp", {"nuslerp_flatten": False}, 2),
    ("multislerp", {}, 3),
    ("karcher", {}, 3),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}, 3),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}, 3),
    ("della", {"density": 0.5}, 3),
    ("della_linear", {"density": 0.5}, 3),
    ("sce", {"select_topk": 0.5}, 3),
    ("model_stock", {}, 3),
    ("model_stock", {"filter_wise": True}, 3),
    ("ram", {}, 3),
    ("ramplus_tl", {}, 3),
    ("nearswap", {"t": 0.05}, 1),
    ("arcee_fusion", {}, 1),
]
SYMMETRIC = [m for m in ALL_METHODS if m[0] in {"multislerp", "karcher", "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock", "ram", "ramplus_tl"}]
PROPERTY = settings(max_examples=10, deadline=None)


def test_every_mergekit_method_is_registered_with_described_parameters():
    for name in [
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "model_stock",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    ]:
        method = METHODS[name]
        for model in (method.params, method.model_params):
            assert all(field.description for field in model.model_fields.values()), (name, model)


@pytest.mark.parametrize("method,params,n", ALL_METHODS, ids=str)
@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_lambda_zero_gives_the_base(method, params, n, seed):
    base, models = random_models(seed, n)
    out = run(method, params, base, models, per_model=[{"lambda": 0.0}] * n)
    for name in base:
        assert torch.equal(out[name], base[name])


@pytest.mark.parametrize(
    "method,params",
    [
        ("slerp", {"t": 1.0}),
        ("multislerp", {}),
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {}),
        ("della", {}),
        ("della_linear", {}),
        ("sce", {}),
        ("nearswap", {"t": 10.0}),
    ],
    ids=str,
)
@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_one_model_gives_that_model(method, params, seed):
    base, models = random_models(seed, 1)
    out = run(method, params, base, models)
    for name in base:
        assert torch.allclose(out[name], models[0][name], atol=1e-5)


@pytest.mark.parametrize("method,params,n", SYMMETRIC, ids=str)
@PROPERTY
@given(seed=st.integers(0, 10_000), data=st.data())
def test_model_order_does_not_matter(method, params, n, seed, data):
    base, models = random_models(seed, n)
    order = data.draw(st.permutations(range(n)))
    out, shuffled = run(method, params, base, models), run(method, params, base, [models[i] for i in order])
    # The Karcher mean is an iteration stopped once its step is under tol = 1e-5, run in mergekit's float32
    # order: two orders stop a few tol apart (at most 2.9e-5 over 40 seeds × every order of 3 models).
    atol = 1e-4 if method == "karcher" else 1e-5
    for name in base:
        assert torch.allclose(out[name], shuffled[name], atol=atol)


@PROPERTY
@given(seed=st.integers(0, 10_000), w1=st.floats(0.1, 3.0), w2=st.floats(0.1, 3.0))
def test_nuslerp_swapping_models_and_weights_changes_nothing(seed, w1, w2):
    base, models = random_models(seed, 2)
    out = run("nuslerp", {}, base, models, per_model=[{"weight": w1}, {"weight": w2}])
    swapped = run("nuslerp", {}, base, models[::-1], per_model=[{"weight": w2}, {"weight": w1}])
    for name in base:
        assert torch.allclose(out[name], swapped[name], atol=1e-5)


# ---------------------------------------------------------------- the base as mergekit counts it (checkpoint folders)


def save_folder(folder, w: torch.Tensor) -> str:
    folder.mkdir()
    save_file({"w": w}, str(folder / "model.safetensors"))
    return str(folder)


def merge_folders(tmp_path, method: str, base: str | None, models: list[str], **parameters) -> torch.Tensor:
    """The merged 'w' of a merge of checkpoint folders (`base` None: no base_model in the config)."""
    config = {"merge_method": method, "models": [{"model": m} for m in models], "parameters": parameters}
    if base is not None:
        config["base_model"] = base
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    executor.merge_to_folder(parse_merge_config(config), out, device="cpu")
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors["w"]


def test_karcher_counts_a_named_base_once_and_runs_without_one(tmp_path):
    a = save_folder(tmp_path / "a", torch.tensor([1.0, 0.0]))
    b = save_folder(tmp_path / "b", torch.tensor([0.0, 1.0]))
    c = save_folder(tmp_path / "c", torch.tensor([0.0, 3.0]))
    # no base: the mean of a and b, at their mean norm 1
    assert close(merge_folders(tmp_path, "karcher", None, [a, b]), [R2, R2])
    # a named base that the models do not list is one more input; listed, it counts once: the mean of a, b, c
    named, listed = merge_folders(tmp_path, "karcher", c, [a, b]), merge_folders(tmp_path, "karcher", c, [a, b, c])
    assert torch.allclose(named, listed, atol=1e-6)
    assert math.isclose(float(named.norm()), 5 / 3, rel_tol=1e-5)


def test_nuslerp_and_multislerp_without_a_base_interpolate_the_weights(tmp_path):
    a = save_folder(tmp_path / "a", torch.tensor([2.0, 0.0]))
    b = save_folder(tmp_path / "b", torch.tensor([0.0, 2.0]))
    assert close(merge_folders(tmp_path, "nuslerp", None, [a, b]), [2 * R2, 2 * R2])
    assert close(merge_folders(tmp_path, "multislerp", None, [a, b]), [2 * R2, 2 * R2])
