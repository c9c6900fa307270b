"""Properties of the merge maths (STYLE.md): λ = 0 gives the base, one model at full density gives that
model, model order does not matter, DARE with p = 0 is task arithmetic, streaming equals one block."""

from __future__ import annotations

import pytest
import torch
from builders import random_models, run
from hypothesis import given, settings
from hypothesis import strategies as st

import pcbcore.executor as executor
import pcbcore.methods.dare as dare

DETERMINISTIC = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "scope": "model"}),
    ("pcb", {"ratio": 0.3}),
    ("pcb", {"ratio": 0.3, "scope": "tensor"}),
    ("pcb", {"ratio": 0.3, "variant": "release", "clip_quantile": 0.05}),
]
ALL = DETERMINISTIC + [("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5})]

PROPERTY = settings(max_examples=15, deadline=None)


@pytest.mark.parametrize("method,params", [m for m in ALL if m[0] != "linear"], ids=str)
@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_lambda_zero_gives_the_base(method, params, seed, n):
    base, models = random_models(seed, n)
    out = run(method, params, base, models, per_model=[{"lambda": 0.0}] * n)
    for name in base:
        assert torch.equal(out[name], base[name])


@pytest.mark.parametrize(
    "method,params",
    [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare_linear", {}), ("dare_ties", {}), ("pcb", {"ratio": 1.0})],
    ids=str,
)
@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_one_model_at_full_density_gives_that_model(method, params, seed):
    base, models = random_models(seed, 1)
    out = run(method, params, base, models)
    for name in base:
        assert torch.allclose(out[name], models[0][name], atol=1e-6)


@pytest.mark.parametrize("method,params", DETERMINISTIC, ids=str)
@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), data=st.data())
def test_model_order_does_not_matter(method, params, seed, n, data):
    base, models = random_models(seed, n)
    lambdas = [{"lambda": 0.5 + 0.25 * i} for i in range(n)]
    order = data.draw(st.permutations(range(n)))
    a = run(method, params, base, models, lambdas)
    b = run(method, params, base, [models[i] for i in order], [lambdas[i] for i in order])
    for name in base:
        assert torch.allclose(a[name], b[name], atol=1e-6)


@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), lam=st.floats(0.0, 2.0))
def test_dare_with_p_zero_equals_task_arithmetic(seed, n, lam):
    base, models = random_models(seed, n)
    a = run("dare_linear", {"density": 1.0, "lambda": lam}, base, models)
    b = run("task_arithmetic", {"lambda": lam}, base, models)
    for name in base:
        assert torch.allclose(a[name], b[name])


# (whole, step): every tensor split into blocks of 10 entries; or only the 17×9 one, the others whole.
# DARE's masks are drawn in chunks of 20 entries (rounded to rows), so blocks cut through chunks.
@pytest.mark.parametrize("blocks", [(10, 10), (130, 10)], ids=["all-streamed", "mixed"])
@pytest.mark.parametrize("method,params", ALL, ids=str)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_streamed_merge_equals_one_block(method, params, blocks, seed):
    base, models = random_models(seed, 3, shapes=((17, 9), (31,), (4, 5, 6)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dare, "DARE_CHUNK_ENTRIES", 20)
        whole = run(method, params, base, models)
        mp.setattr(executor, "BLOCK_ELEMENTS", blocks[0])
        mp.setattr(executor, "STREAM_BLOCK_ELEMENTS", blocks[1])
        streamed = run(method, params, base, models)
    for name in base:
        assert torch.allclose(whole[name], streamed[name], atol=1e-6), name
