"""mergekit's config language on tiny models: slices, the base among the models, null parameters, gradients,
filters, exact TIES density, and `dtype` as the working dtype — each against values worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pcbcore.checkpoint import CheckpointReader
from pcbcore.config import parse_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import merge_state_dicts, merge_to_folder
from pcbmerge.cli import main


def run(tmp_path, data, name="out"):
    merge_to_folder(parse_merge_config(data, source="cfg.yml"), tmp_path / name, device="cpu")
    return CheckpointReader(tmp_path / name)


def test_null_parameters_mean_none(tiny_zoo):
    base, models = tiny_zoo
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {models[0]}\n    parameters:\n      # nothing here\nparameters:\n"
    config = parse_merge_config(yaml.safe_load(text))
    assert config.model_params[0].weight == 1.0


def test_an_error_about_a_listed_model_names_its_index_in_the_file(tiny_zoo):
    base, models = tiny_zoo
    data = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(models[0]), "parameters": {"density": 2}}]}
    with pytest.raises(MergeInputError, match=r"models\[1\]\.parameters\.density"):
        parse_merge_config(data, source="cfg.yml")


def test_a_bad_gradient_entry_is_named_with_its_position(tiny_zoo):
    base, models = tiny_zoo
    data = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(models[0]), "parameters": {"density": [1, 1.5]}}]}
    with pytest.raises(MergeInputError, match=r"models\[0\]\.parameters\.density\[1\]"):
        parse_merge_config(data, source="cfg.yml")


def test_a_lora_reference_without_its_adapter_is_refused_naming_the_key(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    data = {"merge_method": "linear", "models": [{"model": f"{models[0]}+some/lora"}, {"model": str(models[1])}]}
    with pytest.raises(MergeInputError, match=r"'models\[0\]\.model'.*has no adapter_config.json"):
        merge_to_folder(parse_merge_config(data, source="cfg.yml"), tmp_path / "out", device="cpu")


def test_a_weight_gradient_is_read_at_each_layer(tiny_zoo, tmp_path):
    """weight [0, 1] over 2 layers: layer 0 at t = 0 (weight 0, the base), layer 1 at t = 1 (the model);
    tensors outside the layers have t = 0."""
    base, models = tiny_zoo
    out = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(models[0]), "parameters": {"weight": [0, 1]}}]})
    b, m = CheckpointReader(base), CheckpointReader(models[0])
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out.read(name), b.read(name)), name
    assert torch.equal(out.read("model.layers.1.mlp.up_proj.weight"), m.read("model.layers.1.mlp.up_proj.weight"))


def test_a_three_point_gradient_interpolates_as_mergekit():
    from pcbcore.gradients import evaluate

    assert evaluate([1, 0.7, 0.1], "x", 0.0) == 1
    assert evaluate([1, 0.7, 0.1], "x", 0.25) == pytest.approx(0.85)
    assert evaluate([1, 0.7, 0.1], "x", 1.0) == pytest.approx(0.1)
    assert evaluate([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}], "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate([{"filter": "self_attn", "value": 1}], "model.norm.weight", 0.0) is None  # no match: the next source is asked


def test_filters_take_the_first_matching_condition_then_the_fallback(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    weight = [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]
    out = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(models[0]), "parameters": {"weight": weight}}]})
    b, m = CheckpointReader(base), CheckpointReader(models[0])
    assert torch.equal(out.read("model.layers.0.mlp.down_proj.weight"), m.read("model.layers.0.mlp.down_proj.weight"))
    assert torch.equal(out.read("model.layers.0.self_attn.q_proj.weight"), b.read("model.layers.0.self_attn.q_proj.weight"))


def test_top_level_filters_are_defaults_below_the_models_own(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(models[0]), "parameters": {"weight": [{"filter": "q_proj", "value": 0.0}]}}],
        "parameters": {"weight": 1.0},
    }
    out = run(tmp_path, data)
    b, m = CheckpointReader(base), CheckpointReader(models[0])
    assert torch.equal(out.read("model.layers.1.self_attn.q_proj.weight"), b.read("model.layers.1.self_attn.q_proj.weight"))
    assert torch.equal(out.read("model.layers.1.self_attn.k_proj.weight"), m.read("model.layers.1.self_attn.k_proj.weight"))


def test_passthrough_slices_stack_repeated_layers_and_write_the_new_layer_count(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    slices = [{"sources": [{"model": str(models[0]), "layer_range": [0, 2]}]}, {"sources": [{"model": str(models[1]), "layer_range": [1, 2]}]}]
    out = run(tmp_path, {"merge_method": "passthrough", "slices": slices})
    a, b = CheckpointReader(models[0]), CheckpointReader(models[1])
    suffix = ".self_attn.o_proj.weight"
    assert torch.equal(out.read(f"model.layers.0{suffix}"), a.read(f"model.layers.0{suffix}"))
    assert torch.equal(out.read(f"model.layers.1{suffix}"), a.read(f"model.layers.1{suffix}"))
    assert torch.equal(out.read(f"model.layers.2{suffix}"), b.read(f"model.layers.1{suffix}"))
    assert torch.equal(out.read("model.embed_tokens.weight"), a.read("model.embed_tokens.weight"))  # before the layers: the first slice
    assert torch.equal(out.read("lm_head.weight"), b.read("lm_head.weight"))  # after them: the last slice
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert len([n for n in out.tensors if n.startswith("model.layers.2.")]) == len([n for n in a.tensors if n.startswith("model.layers.1.")])


def test_passthrough_takes_one_model_per_slice(tiny_zoo):
    _, models = tiny_zoo
    slices = [{"sources": [{"model": str(models[0]), "layer_range": [0, 2]}, {"model": str(models[1]), "layer_range": [0, 2]}]}]
    with pytest.raises(MergeInputError, match=r"slices\[0\]\.sources"):
        parse_merge_config({"merge_method": "passthrough", "slices": slices}, source="cfg.yml")


def test_a_linear_slice_merges_different_layer_ranges(tiny_zoo, tmp_path):
    """Layer k of the output averages layer k of the first source with layer 1 + k of the second."""
    base, models = tiny_zoo
    slices = [{"sources": [{"model": str(models[0]), "layer_range": [0, 1]}, {"model": str(models[1]), "layer_range": [1, 2]}]}]
    out = run(tmp_path, {"merge_method": "linear", "slices": slices, "parameters": {"weight": 1.0}})
    a, b = CheckpointReader(models[0]), CheckpointReader(models[1])
    name = ".mlp.gate_proj.weight"
    expected = a.read(f"model.layers.0{name}") + 0.5 * (b.read(f"model.layers.1{name}") - a.read(f"model.layers.0{name}"))
    assert torch.allclose(out.read(f"model.layers.0{name}"), expected, atol=1e-6)
    assert "model.layers.1.mlp.gate_proj.weight" not in out.tensors
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_one_model_ties_keeps_exactly_density_of_the_entries_of_a_bf16_tensor(density):
    """bf16 task vectors are full of ties at any cut; exactly max(1, ⌊density·numel⌋) entries are kept."""
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(64, 50)}
    task = {"w": (torch.randn(64, 50, generator=generator) * 0.01).to(torch.bfloat16).float()}
    config = parse_merge_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"density": density}}]})
    out = merge_state_dicts(config, base, [task])["w"]
    assert int((out != 0).sum()) == int(density * 64 * 50)


def test_ties_density_is_exact_over_a_streamed_tensor(monkeypatch):
    import pcbcore.executor as executor

    monkeypatch.setattr(executor, "BLOCK_ELEMENTS", 300)
    monkeypatch.setattr(executor, "STREAM_BLOCK_ELEMENTS", 300)
    task = {"w": torch.tensor([1.0, 2.0, 2.0, 3.0] * 250).reshape(100, 10)}
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"density": 0.6}}]}
    # the components form (float32 maths), streamed in blocks: all 250 threes, and the first 350 of the 500 tied twos
    out = merge_state_dicts(parse_merge_config({**data, "compute_dtype": "float32"}), {"w": torch.zeros(100, 10)}, [task])["w"].reshape(-1)
    assert int((out != 0).sum()) == 600
    twos = (out == 2.0).nonzero().reshape(-1)
    assert len(twos) == 350 and int(twos.max()) < int((task["w"].reshape(-1) == 2.0).nonzero().reshape(-1)[350])
    # mergekit's op order (the file as mergekit runs it): the same count, the twos its unstable argsort keeps
    out = merge_state_dicts(parse_merge_config(data), {"w": torch.zeros(100, 10)}, [task])["w"].reshape(-1)
    kept = torch.zeros(1000, dtype=torch.bool)
    kept[torch.argsort(task["w"].reshape(-1), descending=True)[:600]] = True
    assert int((out != 0).sum()) == 600 and torch.equal(out != 0, kept)


def test_dtype_is_the_working_dtype_and_compute_dtype_opts_into_float32(tiny_zoo):
    """mergekit converts inputs to `dtype` and subtracts there: θ_pre + (θ_1 − θ_pre) rounded in bf16."""
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(1000, generator=generator)}
    model = {"w": base["w"] + 0.01 * torch.randn(1000, generator=generator)}
    data = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 0.3}}], "dtype": "bfloat16"}
    out = merge_state_dicts(parse_merge_config(data), base, [model])["w"]
    b16, m16 = base["w"].to(torch.bfloat16), model["w"].to(torch.bfloat16)
    delta = m16 - b16  # rounded to bf16, as mergekit's working dtype
    expected = b16 + delta * torch.tensor(0.3, dtype=torch.bfloat16)  # and so is every later op (mergekit's order)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    precise = merge_state_dicts(parse_merge_config({**data, "compute_dtype": "float32"}), base, [model])["w"]
    assert torch.equal(precise, (b16.float() + 0.3 * (m16.float() - b16.float())).to(torch.bfloat16))
    assert not torch.equal(precise, out)


def test_cli_refuses_a_slice_past_the_models_layers(tiny_zoo, tmp_path, capsys):
    _, models = tiny_zoo
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(models[0]), "layer_range": [0, 5]}]}]}))
    assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(path) in message and "slices[0].sources[0].layer_range" in message
    assert not (tmp_path / "out").exists()


def test_linear_without_normalize_is_mergekits_plain_weighted_sum():
    """mergekit's `linear` with `normalize: false`: Σ w_i θ_i accumulated in float32, rounded to bf16; it has
    no components form, so pcbmerge's float32 opt-in refuses it in one sentence naming the key."""
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 4, generator=generator).to(torch.bfloat16)}
    models = [{"w": torch.randn(6, 4, generator=generator).to(torch.bfloat16)} for _ in range(2)]
    data = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.6}}],
        "parameters": {"normalize": False},
    }
    out = merge_state_dicts(parse_merge_config(data), base, models)["w"]
    expected = (models[0]["w"].float() * 0.7 + models[1]["w"].float() * 0.6).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    with pytest.raises(MergeInputError, match=r"lin.yml: key 'parameters.normalize': linear with normalize: false"):
        parse_merge_config({**data, "compute_dtype": "float32"}, source="lin.yml")


def test_ties_rescale_is_mergekits_l1_rescale_and_refused_outside_mergekits_order():
    """mergekit's `rescale: true` for ties scales each trimmed task vector back to its L1 norm; it has no
    components form, so pcbmerge's own keys refuse it in one sentence naming the key."""
    generator = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 10, generator=generator)}
    model = {"w": base["w"] + 0.1 * torch.randn(40, 10, generator=generator)}
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"density": 0.3}}], "parameters": {"rescale": True}}
    out = merge_state_dicts(parse_merge_config(data), base, [model])["w"]
    delta = out - base["w"]
    kept = delta != 0
    assert int(kept.sum()) == 120  # ⌊0.3·400⌋
    tau = model["w"] - base["w"]
    assert torch.allclose(delta.abs().sum(), tau.abs().sum(), rtol=1e-5)  # the trimmed vector keeps τ's L1 norm
    assert torch.allclose(delta[kept], tau[kept] * (tau.abs().sum() / tau[kept].abs().sum()), rtol=1e-5)
    for extra in ({"compute_dtype": "float32"}, {"parameters": {"rescale": True, "scope": "model"}}):
        with pytest.raises(MergeInputError, match=r"^t.yml: key 'parameters.rescale': ties with rescale: true"):
            parse_merge_config({**data, **extra}, source="t.yml")


def test_a_slice_can_name_its_own_base(tiny_zoo, tmp_path):
    """mergekit's slice-level `base_model`: that slice's layers are merged around it (here ft0, so with
    weight 1 the second layer is ft1's); `residual_weight` is accepted and ignored, as mergekit ignores it."""
    base, models = tiny_zoo
    src = lambda model, start: {"model": str(model), "layer_range": [start, start + 1]}  # noqa: E731
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "slices": [
            {"sources": [src(base, 0), src(models[0], 0)]},
            {"base_model": str(models[0]), "residual_weight": 0.5, "sources": [src(models[0], 1), src(models[1], 1)]},
        ],
    }
    out = tmp_path / "out"
    merge_to_folder(parse_merge_config(data), out, device="cpu")
    merged, first, second = (CheckpointReader(p) for p in (out, models[0], models[1]))
    layer0 = [n for n in merged.tensors if ".layers.0." in n]
    layer1 = [n for n in merged.tensors if ".layers.1." in n]
    assert layer0 and layer1
    for name in layer0:
        assert torch.allclose(merged.read(name), first.read(name), atol=1e-6), name  # base + (ft0 − base)
    for name in layer1:
        assert torch.allclose(merged.read(name), second.read(name), atol=1e-6), name  # ft0 + (ft1 − ft0)
    wrong = {**data, "slices": [data["slices"][0], {**data["slices"][1], "base_model": str(models[2])}]}
    with pytest.raises(MergeInputError, match=r"key 'slices\[1\].base_model': .* must be one of the slice's sources"):
        parse_merge_config(wrong)


def read_all(folder):
    reader = CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.tensors}, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("form", ["slices", "models"])
def test_a_modules_file_merges_exactly_as_the_same_top_level_slices_or_models(tiny_zoo, tmp_path, form):
    """mergekit's planner turns top-level `models:` / `slices:` into the one module of a decoder-only model,
    `default`; written out as `modules: {default: ...}` the file gives the same model, bit for bit."""
    base, models = tiny_zoo
    if form == "slices":
        src = lambda model, start, **params: {"model": str(model), "layer_range": [start, start + 1], **params}  # noqa: E731
        top = {
            "merge_method": "ties",
            "base_model": str(base),
            "slices": [
                {"sources": [src(base, 0), src(models[0], 0, parameters={"weight": 0.7}), src(models[1], 1)], "parameters": {"density": [0.4, 0.9]}},
                {"sources": [src(base, 1), src(models[1], 0), src(models[2], 1, parameters={"density": 0.3})]},
                {"sources": [src(base, 1), src(models[0], 1), src(models[2], 0)]},
            ],
            "parameters": {"density": 0.6, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
            "dtype": "bfloat16",
        }
    else:
        top = {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": [
                {"model": str(models[0]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(models[1]), "parameters": {"density": [0.3, 0.8]}},
            ],
            "parameters": {"weight": 1.0, "normalize": True},
        }
    modular = {key: value for key, value in top.items() if key != form} | {"modules": {"default": {form: top[form]}}}
    path = tmp_path / "modules.yml"
    path.write_text(yaml.safe_dump(modular))
    assert main(["merge", str(path), str(tmp_path / "modules"), "--device", "cpu"]) == 0
    merge_to_folder(parse_merge_config(top, source="top.yml"), tmp_path / "top", device="cpu")
    (got, got_config), (want, want_config) = read_all(tmp_path / "modules"), read_all(tmp_path / "top")
    assert got.keys() == want.keys()
    assert all(got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]) for name in want)
    assert got_config == want_config
    assert got_config["num_hidden_layers"] == (3 if form == "slices" else 2)


def test_a_modules_parameters_sit_between_a_slices_and_the_top_levels(tiny_zoo, tmp_path):
    """mergekit asks a source's parameters, then its slice's, then its module's, then the top-level ones:
    here down_proj takes the slice's weight 1, the rest of the MLP the module's 0 (the base), and the
    attention (no module filter matches) falls through to the top-level weight 1."""
    base, models = tiny_zoo
    sources = [{"model": str(base), "layer_range": [0, 2]}, {"model": str(models[0]), "layer_range": [0, 2]}]
    out = run(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "modules": {
                "default": {
                    "slices": [{"sources": sources, "parameters": {"weight": [{"filter": "down_proj", "value": 1.0}]}}],
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.0}]},
                }
            },
            "parameters": {"weight": 1.0},
        },
    )
    b, m = CheckpointReader(base), CheckpointReader(models[0])
    for layer in (0, 1):
        name = f"model.layers.{layer}"
        assert torch.equal(out.read(f"{name}.mlp.down_proj.weight"), m.read(f"{name}.mlp.down_proj.weight"))
        assert torch.equal(out.read(f"{name}.mlp.up_proj.weight"), b.read(f"{name}.mlp.up_proj.weight"))
        assert torch.equal(out.read(f"{name}.self_attn.q_proj.weight"), m.read(f"{name}.self_attn.q_proj.weight"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: {**d, "modules": {"vision_tower": d["modules"]["default"]}}, r"key 'modules\.vision_tower' names a module of mergekit's multi-module"),
        (lambda d: {**d, "modules": {"decoderr": d["modules"]["default"]}}, r"key 'modules\.decoderr' names an unknown module; the one module"),
        (lambda d: {**d, "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, r"keys 'modules' and 'slices' are exclusive"),
        (lambda d: {**d, "models": [{"model": "a"}]}, r"keys 'modules' and 'models' are exclusive"),
        (lambda d: {**d, "modules": {}}, r"key 'modules' must map the module 'default' to its 'models' or 'slices'"),
        (
            lambda d: {**d, "modules": {"default": {**d["modules"]["default"], "base_model": "b"}}},
            r"unknown key 'modules\.default\.base_model'; allowed keys are \['models', 'parameters', 'slices'\]",
        ),
        (
            lambda d: {**d, "modules": {"default": {**d["modules"]["default"], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
            r"keys 'modules\.default\.models' and 'modules\.default\.slices' are exclusive",
        ),
        (
            lambda d: {**d, "modules": {"default": {"models": [{"model": "a", "parameters": {"density": 2}}]}}},
            r"key 'modules\.default\.models\[0\]\.parameters\.density'",
        ),
    ],
)
def test_bad_modules_are_refused_in_one_sentence_naming_the_key(change, message):
    data = {"merge_method": "ties", "base_model": "b", "modules": {"default": {"models": [{"model": "a"}]}}}
    parse_merge_config(data, source="cfg.yml")
    with pytest.raises(MergeInputError, match=f"^cfg.yml: {message}") as refused:
        parse_merge_config(change(data), source="cfg.yml")
    assert "\n" not in str(refused.value) and str(refused.value).count(". ") == 0


@pytest.mark.parametrize("architecture", ["Mistral3ForConditionalGeneration", None])
def test_a_multi_module_model_is_refused_per_module_in_one_sentence(tmp_path, architecture):
    """A vision-language model has several modules (mergekit's text_decoder, vision_tower, …), which
    pcbmerge does not merge per module: known by its config.json, or by its tensors in two layer stacks."""
    from safetensors.torch import save_file

    folders = []
    for name in ("base", "ft"):
        folder = tmp_path / name
        folder.mkdir()
        tensors = {f"{stack}.layers.{i}.w": torch.randn(2, 2) for stack in ("language_model.model", "vision_tower.transformer") for i in range(2)}
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"architectures": [architecture or "SomeForConditionalGeneration"]}))
        folders.append(folder)
    sources = [{"model": str(f), "layer_range": [0, 2]} for f in folders]
    data = {"merge_method": "task_arithmetic", "base_model": str(folders[0]), "modules": {"default": {"slices": [{"sources": sources}]}}}
    what = "a Mistral3ForConditionalGeneration, whose modules mergekit names text_decoder" if architecture else r"a model of 2 layer stacks \(language_model"
    with pytest.raises(MergeInputError, match=rf"^cfg.yml: key 'modules\.default': model '.*base' is {what}.*merges only single-module models"):
        merge_to_folder(parse_merge_config(data, source="cfg.yml"), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
