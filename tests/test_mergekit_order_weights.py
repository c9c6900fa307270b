"""mergekit's op order for the methods on the weights (model_stock, karcher, multislerp, nuslerp, nearswap, sce,
arcee_fusion): a mergekit file gives mergekit's own bits, and `compute_dtype: float32` keeps the components form.

Each expected value is written here in mergekit's sequence of operations, in the inputs' dtype — so the same
function on float64 inputs is the float64 maths the components form is held to.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pcbcore.config import parse_merge_config
from pcbcore.executor import merge_state_dicts, merge_to_folder

SHAPES = {"w": (4, 6), "b": (6,)}  # a matrix (rows along the last dimension) and a vector
DTYPES = [torch.bfloat16, torch.float32]


def hand_made(n: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A base near 0.1 in size and n fine-tunes 0.02 away from it, in float64 (rounded by each test)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: 0.1 * torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    models = [{k: v + 0.02 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()} for _ in range(n)]
    return base, models


def cast(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in state.items()}


def merge(method: str, base: dict, models: list[dict], parameters: dict, weights=None, **keys) -> dict:
    entries = [{"model": f"m{i}", "parameters": {} if weights is None else {"weight": weights[i]}} for i in range(len(models))]
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": parameters, **keys})
    return merge_state_dicts(config, base, models, device="cpu")


def assert_bits(out: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert out[name].dtype == value.dtype, name
        assert torch.equal(out[name], value), (name, (out[name].double() - value.double()).abs().max())


def assert_float64_maths(out: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert out[name].dtype == torch.float32, name
        assert torch.allclose(out[name].double(), value, rtol=1e-5, atol=1e-6), (name, (out[name].double() - value).abs().max())


# ---------------------------------------------------------------- mergekit's orders, written out


def model_stock_order(base, models, filter_wise=False):
    w0 = base.unsqueeze(0) if filter_wise and base.dim() == 1 else (base if filter_wise else base.reshape(-1))
    ws = [m.reshape(w0.shape) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            cosines.append(((a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos) / (1 + (n - 1) * cos)  # hand-made models: never the singular denominator
    average = ws[0]
    for w in ws[1:]:
        average = average + w
    return (t * (average / n) + (1 - t) * w0).reshape(base.shape)


def karcher_order(tensors, max_iter=10, tol=1e-5):
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    k = len(tensors)
    alpha = 1.0 / k
    share = alpha / sum([alpha] * k)
    norms = [torch.linalg.vector_norm(x.to(norm_dtype)) for x in tensors]
    units = [(x / n).to(x.dtype) for x, n in zip(tensors, norms)]  # hand-made: no zero norm
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += share * u
    mean = (mean / torch.linalg.vector_norm(mean.to(norm_dtype))).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.dot(mean.flatten(), u.flatten()).clamp(-1.0, 1.0)
            theta = dot.arccos()
            if theta.item() >= tol:
                tangent += share * (theta / theta.sin()) * (u - dot * mean)
        size = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if size.item() < tol:
            break
        mean = (size.cos() * mean + size.sin() * (tangent / size)).to(mean.dtype)
        mean = (mean / torch.linalg.vector_norm(mean.to(norm_dtype))).to(mean.dtype)
    scale = 0
    for n in norms:
        scale = scale + alpha * n
    return scale * mean


def multislerp_order(base, models, weights, normalize_weights=True, eps=1e-8):
    deltas = torch.stack([m - base for m in models]).reshape(len(models), -1)
    w = torch.tensor(weights, dtype=deltas.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = deltas.norm(dim=-1, keepdim=True)
    units = deltas / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    size = tangent.norm() + eps
    result = mean * size.cos() + tangent * (size.sin() / size)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(base.shape) + base


def nuslerp_order(base, models, weights, flatten=True, row_wise=False):
    t = weights[1] / (weights[0] + weights[1])
    v0, v1 = models[0] - base, models[1] - base
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1).acos()  # hand-made: never collinear
    result = ((1 - t) * theta).sin() * v0
    result = (result + (t * theta).sin() * v1) / theta.sin()
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return base + result.reshape(base.shape)


def nearswap_order(base, other, t):
    weight = (t / (other - base).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def sce_order(base, models, select_topk=1.0):
    deltas = torch.stack([m - base for m in models])
    if select_topk < 1:
        variance = deltas.var(dim=0, unbiased=False)
        keep = torch.zeros_like(variance)
        k = int(torch.count_nonzero(variance) * select_topk)
        keep.view(-1)[variance.abs().flatten().topk(k).indices] = 1
        deltas = deltas * keep
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agrees = deltas.sign() == elected
    eta = deltas.square().reshape(len(models), -1).mean(dim=1)
    eta = (eta / eta.sum().item()).reshape(-1, *[1] * base.dim())
    erased = eta * agrees
    return base + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def arcee_fusion_order(base, other):
    p, q = other.softmax(dim=-1) + 1e-8, base.softmax(dim=-1) + 1e-8
    scores = (other - base).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    ordered = scores.flatten().sort().values
    last = ordered.numel() - 1
    q1, median, q3 = ordered[int(0.25 * last)], ordered[int(0.5 * last)], ordered[int(0.75 * last)]
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def expected_of(order, base: dict, models: list[dict], **kwargs) -> dict:
    return {name: order(base[name], [m[name] for m in models], **kwargs) for name in base}


# ---------------------------------------------------------------- one case per method and setting

CASES = [  # (method, parameters, number of models, weights, the expected values of (base, models))
    ("model_stock", {}, 3, None, lambda b, ms: expected_of(model_stock_order, b, ms)),
    ("model_stock", {"filter_wise": True}, 3, None, lambda b, ms: expected_of(model_stock_order, b, ms, filter_wise=True)),
    ("karcher", {}, 2, None, lambda b, ms: {k: karcher_order([m[k] for m in ms] + [b[k]]) for k in b}),  # the named base is one more input, last
    ("karcher", {"max_iter": 3}, 3, None, lambda b, ms: {k: karcher_order([m[k] for m in ms] + [b[k]], max_iter=3) for k in b}),
    ("multislerp", {}, 3, [0.5, 0.3, 0.9], lambda b, ms: expected_of(multislerp_order, b, ms, weights=[0.5, 0.3, 0.9])),
    (
        "multislerp",
        {"normalize_weights": False},
        2,
        [0.4, 0.6],
        lambda b, ms: expected_of(multislerp_order, b, ms, weights=[0.4, 0.6], normalize_weights=False),
    ),
    ("nuslerp", {}, 2, [0.3, 0.7], lambda b, ms: expected_of(nuslerp_order, b, ms, weights=[0.3, 0.7])),
    ("nuslerp", {"nuslerp_flatten": False}, 2, [1.0, 1.0], lambda b, ms: expected_of(nuslerp_order, b, ms, weights=[1.0, 1.0], flatten=False)),
    (
        "nuslerp",
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        2,
        [1.0, 2.0],
        lambda b, ms: expected_of(nuslerp_order, b, ms, weights=[1.0, 2.0], flatten=False, row_wise=True),
    ),
    ("nearswap", {"t": 0.01}, 1, None, lambda b, ms: {k: nearswap_order(b[k], ms[0][k], 0.01) for k in b}),
    ("sce", {}, 3, None, lambda b, ms: expected_of(sce_order, b, ms)),
    ("sce", {"select_topk": 0.5}, 3, None, lambda b, ms: expected_of(sce_order, b, ms, select_topk=0.5)),
    ("arcee_fusion", {}, 1, None, lambda b, ms: {k: arcee_fusion_order(b[k], ms[0][k]) for k in b}),
]
IDS = [f"{method}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for method, params, *_ in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,params,n,weights,expected", CASES, ids=IDS)
def test_a_mergekit_file_gives_mergekits_bits(method, params, n, weights, expected, dtype):
    """No `compute_dtype`: each op rounds in the stored dtype, as mergekit's method does on these inputs."""
    base, models = hand_made(n)
    base, models = cast(base, dtype), [cast(m, dtype) for m in models]
    assert_bits(merge(method, base, models, params, weights), expected(base, models))


@pytest.mark.parametrize("method,params,n,weights,expected", CASES, ids=IDS)
def test_dtype_rounds_float32_inputs_before_mergekits_order(method, params, n, weights, expected):
    """`dtype: bfloat16` on float32 inputs: the inputs are rounded to bf16 first, then merged there."""
    base, models = hand_made(n, seed=1)
    base, models = cast(base, torch.float32), [cast(m, torch.float32) for m in models]
    rounded = expected(cast(base, torch.bfloat16), [cast(m, torch.bfloat16) for m in models])
    assert_bits(merge(method, base, models, params, weights, dtype="bfloat16"), rounded if method == "arcee_fusion" else cast(rounded, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,params,n,weights,expected", CASES, ids=IDS)
def test_compute_dtype_float32_keeps_the_components_form(method, params, n, weights, expected, dtype):
    """`compute_dtype: float32` (written out in float32): the components form, within float32 of float64 maths."""
    base, models = hand_made(n, seed=2)
    base, models = cast(base, dtype), [cast(m, dtype) for m in models]
    exact64 = expected(cast(base, torch.float64), [cast(m, torch.float64) for m in models])
    assert_float64_maths(merge(method, base, models, params, weights, compute_dtype="float32", out_dtype="float32"), exact64)


@pytest.mark.parametrize("method,params,n,weights,expected", CASES, ids=IDS)
def test_a_per_model_lambda_is_pcbmerges_own_and_merges_in_the_components_form(method, params, n, weights, expected):
    """mergekit has no per-model λ for these methods: λ = 0 gives the base to the bit, in bf16 too."""
    base, models = hand_made(n, seed=3)
    base, models = cast(base, torch.bfloat16), [cast(m, torch.bfloat16) for m in models]
    entries = [{"model": f"m{i}", "parameters": {"lambda": 0.0, **({} if weights is None else {"weight": weights[i]})}} for i in range(n)]
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": params})
    out = merge_state_dicts(config, base, models, device="cpu")
    for name, value in base.items():
        assert torch.equal(out[name].to(value.dtype), value), name


# ---------------------------------------------------------------- what each method adds


def test_arcee_fusion_writes_float32_without_out_dtype_as_mergekit_does():
    """mergekit's mask is float32, so its result is float32 under `dtype: bfloat16`; `out_dtype` rounds it."""
    base, models = hand_made(1, seed=4)
    base, models = cast(base, torch.bfloat16), [cast(m, torch.bfloat16) for m in models]
    expected = {k: arcee_fusion_order(base[k], models[0][k]) for k in base}
    assert_bits(merge("arcee_fusion", base, models, {}, dtype="bfloat16"), expected)
    assert_bits(merge("arcee_fusion", base, models, {}, dtype="bfloat16", out_dtype="bfloat16"), cast(expected, torch.bfloat16))
    double = merge("arcee_fusion", cast(base, torch.float64), [cast(models[0], torch.float64)], {})
    assert all(v.dtype == torch.float64 for v in double.values())


def test_arcee_fusion_mask_compares_bf16_importances():
    """The threshold and importances are rounded to bf16 before comparing: what mergekit keeps, to the entry."""
    base = {"w": torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)}
    other = {"w": torch.tensor([[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.5, 0.9]], dtype=torch.bfloat16)}
    out = merge("arcee_fusion", base, [other], {})["w"]
    kept = out != 0
    assert kept.tolist() == [[False] * 6 + [True, True]]  # the two outlying changes, above median + 1.5 IQR
    assert torch.equal(out[kept], other["w"][kept].float())


def test_nearswap_takes_near_entries_whole_in_bf16():
    base = {"w": torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16)}
    other = {"w": torch.tensor([[1.0078125, 1.5, 0.5, 1.0]], dtype=torch.bfloat16)}  # one bf16 ulp away, far up, far down, equal
    out = merge("nearswap", base, [other], {"t": 0.01})["w"]
    assert out[0, 0] == other["w"][0, 0] and out[0, 3] == 1.0
    assert torch.equal(out, nearswap_order(base["w"], other["w"], 0.01))


def test_nearswap_in_mergekits_order_streams_in_blocks(monkeypatch):
    """Elementwise: blocks of rows give the same bits as the whole tensor."""
    import pcbcore.executor as executor

    base, models = hand_made(1, seed=5)
    base, models = cast(base, torch.bfloat16), [cast(m, torch.bfloat16) for m in models]
    whole = merge("nearswap", base, models, {"t": 0.01})
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 6)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 6)
    blocks = []
    original = executor.BlockLoader.load_whole
    monkeypatch.setattr(executor.BlockLoader, "load_whole", lambda self, info, rows=None: blocks.append((info.name, rows)) or original(self, info, rows))
    assert_bits(merge("nearswap", base, models, {"t": 0.01}), whole)
    assert ("w", (0, 1)) in blocks and len(blocks) > len(SHAPES)  # the (4, 6) tensor in rows of 6 entries


def test_sce_elects_plus_on_a_zero_sum_and_drops_a_zero_sign():
    """Two task vectors of opposite signs summing to exactly 0: mergekit elects +, and a zero delta never agrees."""
    base = {"w": torch.zeros(1, 4, dtype=torch.bfloat16)}
    models = [{"w": torch.tensor([[0.5, -0.25, 0.0, 0.125]], dtype=torch.bfloat16)}, {"w": torch.tensor([[-0.5, 0.5, 0.25, 0.125]], dtype=torch.bfloat16)}]
    out = merge("sce", base, models, {})["w"]
    assert torch.equal(out, sce_order(base["w"], [m["w"] for m in models]))
    assert out[0, 0] == 0.5  # + elected: only the first model's +0.5 counts
    assert out[0, 2] == 0.25  # the first model's 0 has sign 0, left out of the divisor


def save_folders(tmp_path, states: dict) -> dict:
    """Each state dict saved as a checkpoint folder; their paths by name."""
    for name, state in states.items():
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name / "model.safetensors"))
    return {name: str(tmp_path / name) for name in states}


def merge_folders(tmp_path, data: dict) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    merge_to_folder(parse_merge_config(data), out, device="cpu")
    return load_file(str(next(out.glob("*.safetensors"))))


def test_karcher_with_the_base_listed_counts_it_once_in_listed_order(tmp_path):
    """A base listed among the models is one of the inputs where it is listed, not appended."""
    base, (m0, m1) = hand_made(2, seed=6)
    base, m0, m1 = (cast(s, torch.bfloat16) for s in (base, m0, m1))
    at = save_folders(tmp_path, {"base": base, "m0": m0, "m1": m1})
    out = merge_folders(tmp_path, {"merge_method": "karcher", "base_model": at["base"], "models": [{"model": at[k]} for k in ("m0", "base", "m1")]})
    assert_bits(out, {k: karcher_order([m0[k], base[k], m1[k]]) for k in base})


def test_without_a_base_multislerp_nuslerp_and_karcher_take_the_weights_in_mergekits_order(tmp_path):
    (a, b), (c,) = hand_made(2, seed=7)[1], hand_made(1, seed=8)[1]
    a, b, c = (cast(s, torch.bfloat16) for s in (a, b, c))
    at = save_folders(tmp_path, {"a": a, "b": b, "c": c})

    def run(method, names):
        return merge_folders(tmp_path, {"merge_method": method, "models": [{"model": at[k]} for k in names]})

    zero = {k: torch.zeros_like(v) for k, v in a.items()}  # θ_pre = 0: mergekit's maths on the weights themselves
    assert_bits(run("nuslerp", "ab"), expected_of(nuslerp_order, zero, [a, b], weights=[1.0, 1.0]))
    assert_bits(run("multislerp", "abc"), expected_of(multislerp_order, zero, [a, b, c], weights=[1.0, 1.0, 1.0]))
    assert_bits(run("karcher", "abc"), {k: karcher_order([a[k], b[k], c[k]]) for k in a})
