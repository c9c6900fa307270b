"""Each method on tiny tensors, against values computed by hand."""

from __future__ import annotations

import re

import pytest
import torch

import pcbcore.methods.dare as dare
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_state_dicts
from pcbcore.stages import Block

BASE = {"w": torch.zeros(4)}
TASKS = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}, {"w": torch.tensor([-1.0, -1.0, 1.0, 2.0])}]


def merge(method: str, tasks=TASKS, base=BASE, device="cpu", models=None, **parameters) -> torch.Tensor:
    entries = models or [{"model": f"m{i}"} for i in range(len(tasks))]
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": parameters})
    return merge_state_dicts(config, base, tasks, device=device)["w"].cpu()


def test_linear_is_the_weighted_average_of_the_models(device):
    tasks = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    base = {"w": torch.tensor([100.0, -7.0])}  # the average does not depend on the base
    models = [{"model": "a", "parameters": {"weight": 3.0}}, {"model": "b", "parameters": {"weight": 1.0}}]
    out = merge("linear", tasks, base, device, models=models)
    assert torch.allclose(out, torch.tensor([1.5, 3.0]))


def test_task_arithmetic_adds_lambda_times_the_task_vectors(device):
    assert torch.allclose(merge("task_arithmetic", device=device), torch.tensor([0.0, -3.0, 4.0, 2.5]))
    assert torch.allclose(merge("task_arithmetic", device=device, **{"lambda": 0.5}), torch.tensor([0.0, -1.5, 2.0, 1.25]))
    # normalize divides by the sum of weights: (2·τ1 + 2·τ2) / 4
    models = [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b", "parameters": {"weight": 2.0}}]
    assert torch.allclose(merge("task_arithmetic", device=device, models=models, normalize=True), torch.tensor([0.0, -1.5, 2.0, 1.25]))


def test_ties_trims_elects_and_takes_the_disjoint_mean(device):
    # density 0.5 keeps exactly 2 of 4: τ1 → [0, -2, 3, 0]; τ2's cut is 1 (rank 2 of [1,1,1,2]): the 2 and the
    # first of the tied 1s, τ2 → [-1, 0, 0, 2]. Sum [-1, -2, 3, 2] elects [-, -, +, +]; no entry has two agreeing.
    assert torch.allclose(merge("ties", device=device, density=0.5), torch.tensor([-1.0, -2.0, 3.0, 2.0]))


def test_ties_without_normalize_sums_agreeing_entries(device):
    assert torch.allclose(merge("ties", device=device, density=0.5, normalize=False), torch.tensor([-1.0, -2.0, 3.0, 2.0]))


def test_ties_breaks_a_zero_sum_with_the_majority_sign(device):
    # Entry 0 cancels exactly (1 − 1 = 0); the other elected signs are [-, +, +]: majority +, so +1 wins there.
    majority = {"density": 1.0, "normalize": False, "zero_sign": "majority"}
    assert torch.allclose(merge("ties", device=device, **majority), torch.tensor([1.0, -3.0, 4.0, 2.5]))
    flipped = [{"w": -t["w"]} for t in TASKS]  # elected signs [+, −, −]: majority −, so the −1 wins
    assert torch.allclose(merge("ties", flipped, device=device, **majority), torch.tensor([-1.0, 3.0, -4.0, -2.5]))
    # mergekit's rule (the default): + where the sum is exactly 0, whatever the other signs.
    assert torch.allclose(merge("ties", flipped, device=device, density=1.0, normalize=False), torch.tensor([1.0, 3.0, -4.0, -2.5]))


def test_dare_with_density_one_is_task_arithmetic(device):
    assert torch.allclose(merge("dare_linear", device=device, density=1.0), merge("task_arithmetic", device=device))


def test_dare_drops_about_one_minus_density_and_rescales(device):
    base = {"w": torch.zeros(20_000)}
    tasks = [{"w": torch.ones(20_000)}]
    out = merge("dare_linear", tasks, base, device, density=0.25, seed=7)
    kept = out != 0
    assert 0.23 < kept.float().mean() < 0.27
    # mergekit's rescale (its op order, a mergekit file): survivors scaled back to the task vector's L1 norm
    assert torch.allclose(out[kept], torch.full_like(out[kept], 20_000 / int(kept.sum())))
    # the components form (float32 maths): the same draws, survivors scaled by 1/density (the DARE paper's rescale)
    models = [{"model": "m0", "parameters": {"density": 0.25}}]
    config = parse_merge_config({"merge_method": "dare_linear", "base_model": "base", "models": models, "parameters": {"seed": 7}, "compute_dtype": "float32"})
    precise = merge_state_dicts(config, base, tasks, device=device)["w"].cpu()
    assert torch.equal(precise != 0, kept) and torch.allclose(precise[kept], torch.full_like(out[kept], 4.0))
    again = merge("dare_linear", tasks, base, device, density=0.25, seed=7)
    other = merge("dare_linear", tasks, base, device, density=0.25, seed=8)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_dare_masks_do_not_depend_on_the_device(device):
    base = {"w": torch.zeros(1000)}
    tasks = [{"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}, {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}]
    assert torch.allclose(merge("dare_ties", tasks, base, device, density=0.3), merge("dare_ties", tasks, base, "cpu", density=0.3))


def test_pcb_release_matches_the_hand_computation(device):
    # Σ τ = [0, -3, 4, 2.5]. Task 1: Norm|τ| = [.2, .6, 1, 0] → intra e^{2x²}; inter tanh(τ ⊙ Σ τ) = tanh([0, 6, 12, 1.25]);
    # scores [0, 2.05, 7.39, .85], rank-2 cut 2.05 → scale [0, 0, 1, 0]. Task 2: Norm|τ| = [0, 0, 0, 1],
    # scores [0, .995, .999, 7.39], cut .999 → scale [0, 0, 0, 1]. Merge Σ scale·c / Σ scale = [0, 0, 3, 2].
    out = merge("pcb", device=device, ratio=0.5, variant="release", clip_quantile=0.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 3.0, 2.0]))


def test_pcb_paper_matches_the_hand_computation(device):
    # Two tasks, two entries, r = 1 (keep all). τ1 = [1, 0], τ2 = [0, 2]; n = 2.
    # Norm(τ1²) = [1, 0] → β_intra,1 = softmax(2·[1, 0]) = [e²/(e²+1), 1/(e²+1)]; likewise β_intra,2 = [1/(e²+1), e²/(e²+1)].
    # τ1⊙τ2 = [0, 0] → Norm = 0 → softmax = [½, ½]; τ1⊙τ1 = [1, 0] → softmax([1, 0]) = [e/(e+1), 1/(e+1)].
    # β_inter,1 = [e/(e+1) + ½, 1/(e+1) + ½]; β_inter,2 = [½ + 1/(e+1), ½ + e/(e+1)].
    # Entry 0: only τ1 is non-zero → merged = β1 τ1 / (β1 + β2); by symmetry entry 1 is the mirror image.
    e = torch.tensor(1.0).exp()
    intra_hi, intra_lo = e**2 / (e**2 + 1), 1 / (e**2 + 1)
    inter_hi, inter_lo = e / (e + 1) + 0.5, 1 / (e + 1) + 0.5
    b1, b2 = intra_hi * inter_hi, intra_lo * inter_lo
    expected = torch.tensor([b1 / (b1 + b2) * 1.0, b1 / (b1 + b2) * 2.0])
    tasks = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
    out = merge("pcb", tasks, {"w": torch.zeros(2)}, device, ratio=1.0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_pcb_paper_drops_all_but_the_kept_fraction(device):
    gen = torch.Generator().manual_seed(3)
    tasks = [{"w": torch.randn(1000, generator=gen)} for _ in range(3)]
    base = {"w": torch.zeros(1000)}
    out = merge("pcb", tasks, base, device, ratio=0.1)
    # each task keeps 100 entries; where no task keeps an entry the base (0) stays
    assert 100 <= int((out != 0).sum()) <= 300


def test_per_model_lambda_scales_each_component(device):
    models = [{"model": "a", "parameters": {"lambda": 2.0}}, {"model": "b", "parameters": {"lambda": 0.0}}]
    assert torch.allclose(merge("task_arithmetic", device=device, models=models), 2.0 * TASKS[0]["w"])


def test_non_float_tensors_are_copied_from_the_base():
    base = {"w": torch.zeros(2), "ids": torch.tensor([1, 2, 3])}
    tasks = [{"w": torch.ones(2), "ids": torch.tensor([9, 9, 9])}]
    config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}]})
    out = merge_state_dicts(config, base, tasks, device="cpu")
    assert torch.equal(out["ids"], base["ids"]) and torch.equal(out["w"], torch.ones(2))


def test_dare_masks_are_drawn_per_chunk_of_rows_whatever_the_block(monkeypatch):
    """A block's mask is the slice of its tensor's chunk masks: blocks cutting through chunks agree with
    the whole tensor's mask, and each chunk is drawn from its own generator."""
    monkeypatch.setattr(dare, "DARE_CHUNK_ENTRIES", 12)  # 7×4 tensor: chunks of 3 rows
    whole = dare.keep_mask(5, 1, 0.5, Block("w", 0, (7, 4)))
    assert whole.shape == (28,)
    for start, stop in [(0, 2), (2, 5), (5, 7), (1, 7)]:
        assert torch.equal(dare.keep_mask(5, 1, 0.5, Block("w", 9, (7, 4), (start, stop))), whole[start * 4 : stop * 4])
    first_chunk = torch.rand(12, generator=dare.chunk_generator(5, 1, "w", 0)) < 0.5
    assert torch.equal(whole[:12], first_chunk)
    assert not torch.equal(dare.keep_mask(5, 0, 0.5, Block("w", 0, (7, 4))), whole)  # another model, another mask


def test_dare_ties_draws_each_mask_once_over_a_streamed_tensor(monkeypatch):
    """A tensor of several blocks takes a majority-sign pass; its masks are kept for the components step."""
    import pcbcore.executor as executor

    monkeypatch.setattr(dare, "DARE_CHUNK_ENTRIES", 10)  # 40×5: chunks of 2 rows, 20 per model
    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 50)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 10)
    drawn = []
    real = dare.chunk_generator
    monkeypatch.setattr(dare, "chunk_generator", lambda *key: drawn.append(key) or real(*key))
    gen = torch.Generator().manual_seed(0)
    tasks = [{"w": torch.randn(40, 5, generator=gen)} for _ in range(3)]
    merge("dare_ties", tasks, {"w": torch.zeros(40, 5)}, density=0.5)
    assert len(drawn) == len(set(drawn)) == 3 * 20


def test_state_dicts_are_checked_as_folders_are():
    """merge_state_dicts refuses what a folder merge refuses: a missing, misshapen or extra tensor."""
    for model, message in [
        ({}, "tensor 'w' is in base model 'base' but missing from model 'm1'"),
        ({"w": torch.zeros(5)}, "tensor 'w' has shape [4] in base model 'base' but [5] in model 'm1'"),
        ({"w": torch.zeros(4), "v": torch.zeros(1)}, "tensor 'v' is in model 'm1' but not in base model 'base'"),
    ]:
        with pytest.raises(MergeInputError, match=re.escape(message)):
            merge("task_arithmetic", [TASKS[0], model])


def test_a_whole_tensor_method_sees_each_tensor_in_one_block(monkeypatch):
    """Methods that need a tensor whole (a matrix's SVD) get it as one block even where the engine would
    stream it in row blocks; the others keep streaming."""
    from dataclasses import replace

    from pcbcore import executor
    from pcbcore.config import parse_merge_config
    from pcbcore.methods import METHODS

    seen: list = []

    def components(task_vectors, stats, params, model_params, block):
        seen.append((block.name, block.rows, task_vectors.shape[-1]))
        return task_vectors.clone()

    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 8)  # a 6×4 tensor streams in row blocks
    base = {"w": torch.zeros(6, 4)}
    models = [{"w": torch.full((6, 4), float(i + 1))} for i in range(2)]
    config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]})
    for whole, expected in [(True, [("w", None, 24)]), (False, [("w", (0, 2), 8), ("w", (2, 4), 8), ("w", (4, 6), 8)])]:
        method = replace(METHODS["task_arithmetic"], components=components, scales=None, whole_tensor=whole, exact=None)
        monkeypatch.setattr(type(config), "method", property(lambda self, method=method: method))
        seen.clear()
        merged = merge_state_dicts(config, base, models)
        assert seen == expected
        assert torch.equal(merged["w"], torch.full((6, 4), 3.0))
