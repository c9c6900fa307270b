"""Every bad input: one sentence naming the file or key at fault, exit status 2, no output folder."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pcbmerge.cli import main


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    return tmp_path, base, models


def write_config(tmp_path, base, models, name="cfg.yml", **extra):
    data = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(m)} for m in models], **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def refuse(capsys, tmp_path, config, *needles, out_name="out", extra_args=()):
    out = tmp_path / out_name
    existed = out.exists()
    code = main(["merge", str(config), str(out), "--device", "cpu", *extra_args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    message = err[-1]
    assert message.startswith("error: ")
    for needle in needles:
        assert needle in message, message
    assert out.exists() == existed
    assert not list(tmp_path.glob(f".{out_name}.tmp-*"))
    return message


def copy_model(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_mismatched_shapes_name_the_tensor_and_both_shapes(zoo, capsys):
    tmp, base, models = zoo
    bad = copy_model(models[0], tmp / "bad", lambda t: t.update({"model.norm.weight": torch.ones(40)}))
    refuse(capsys, tmp, write_config(tmp, base, [bad, models[1]]), "model.norm.weight", "[32]", "[40]", str(bad))


def test_missing_tensor_names_the_tensor_and_the_model(zoo, capsys):
    tmp, base, models = zoo
    bad = copy_model(models[0], tmp / "bad", lambda t: t.pop("model.norm.weight"))
    refuse(capsys, tmp, write_config(tmp, base, [bad]), "model.norm.weight", "missing", str(bad))


def test_folder_without_safetensors(zoo, capsys):
    tmp, base, models = zoo
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    refuse(capsys, tmp, write_config(tmp, base, [empty]), str(empty), "no safetensors")


def test_truncated_safetensors(zoo, capsys):
    tmp, base, models = zoo
    bad = copy_model(models[0], tmp / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    refuse(capsys, tmp, write_config(tmp, base, [bad]), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(zoo, capsys):
    tmp, base, models = zoo
    bad = copy_model(models[0], tmp / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (bad / "model.safetensors").write_bytes(bytes(data))
    refuse(capsys, tmp, write_config(tmp, base, [bad]), "model.safetensors", "corrupt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_input_tensor(zoo, capsys, value):
    tmp, base, models = zoo

    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = value

    bad = copy_model(models[1], tmp / "bad", poison)
    refuse(capsys, tmp, write_config(tmp, base, [models[0], bad]), "model.layers.1.mlp.down_proj.weight", "NaN or Inf", str(bad))


def test_a_task_vector_that_overflows_float32(zoo, capsys):
    """Finite inputs whose difference does not fit in float32 are named as such, not as NaN/Inf."""
    tmp, base, models = zoo
    name = "model.layers.1.mlp.down_proj.weight"

    def low(t):
        t[name][3, 4] = -3e38

    def high(t):
        t[name][3, 4] = 3e38

    far_base, far = copy_model(base, tmp / "far-base", low), copy_model(models[1], tmp / "far", high)
    refuse(capsys, tmp, write_config(tmp, far_base, [models[0], far]), name, str(far), "more than float32 can hold")


def test_pickle_checkpoint_refused_unless_allowed(zoo, capsys):
    tmp, base, models = zoo
    pick = tmp / "pickled"
    pick.mkdir()
    torch.save(load_file(models[0] / "model.safetensors"), pick / "pytorch_model.bin")
    refuse(capsys, tmp, write_config(tmp, base, [pick]), str(pick), "allow_pickle")
    allowed = write_config(tmp, base, [pick], name="allowed.yml", allow_pickle=True)
    assert main(["merge", str(allowed), str(tmp / "out"), "--device", "cpu"]) == 0


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"merge_method": "tie"}, ["unknown merge method 'tie'", "pcb"]),
        ({"merge_metod": "ties"}, ["unknown key 'merge_metod'"]),
        ({"parameters": {"densty": 0.5}}, ["'parameters.densty'", "density"]),
        ({"parameters": {"ratio": 0.5}}, ["'parameters.ratio'"]),
        ({"parameters": {"density": 0.0}}, ["'parameters.density'", "greater than 0"]),
        ({"parameters": {"density": 1.5}}, ["'parameters.density'", "less than or equal to 1"]),
        ({"merge_method": "pcb", "parameters": {"ratio": 0}}, ["'parameters.ratio'"]),
        ({"merge_method": "pcb", "parameters": {"ratio": 1.01}}, ["'parameters.ratio'"]),
        ({"merge_method": "pcb", "parameters": {"variant": "papers"}}, ["'parameters.variant'"]),
        ({"models": []}, ["'models'", "at least one fine-tuned model"]),
        ({"slices": []}, ["slices"]),
        ({"dtype": "float8"}, ["'dtype'"]),
    ],
    ids=str,
)
def test_config_errors_name_the_key(zoo, capsys, change, needles):
    tmp, base, models = zoo
    config = write_config(tmp, base, models)
    data = yaml.safe_load(config.read_text())
    data.update(change)
    config.write_text(yaml.safe_dump(data))
    refuse(capsys, tmp, config, str(config), *needles)


def test_per_model_density_out_of_range_names_the_model_entry(zoo, capsys):
    tmp, base, models = zoo
    config = tmp / "c.yml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [{"model": str(models[0]), "parameters": {"density": -1}}]}))
    refuse(capsys, tmp, config, "models[0].parameters.density")


def test_only_the_base_among_models_means_no_fine_tuned_model(zoo, capsys):
    tmp, base, models = zoo
    refuse(capsys, tmp, write_config(tmp, base, [base]), "at least one fine-tuned model")


def test_existing_output_folder_is_refused_unless_overwrite(zoo, capsys):
    tmp, base, models = zoo
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    config = write_config(tmp, base, models)
    refuse(capsys, tmp, config, str(tmp / "out"), "--overwrite")
    assert (tmp / "out" / "keep.txt").read_text() == "mine"
    assert main(["merge", str(config), str(tmp / "out"), "--device", "cpu", "--overwrite"]) == 0
    assert not (tmp / "out" / "keep.txt").exists() and (tmp / "out" / "model.safetensors").is_file()


def test_missing_config_and_bad_yaml(zoo, capsys):
    tmp, base, models = zoo
    refuse(capsys, tmp, tmp / "nope.yml", "nope.yml", "does not exist")
    bad = tmp / "bad.yml"
    bad.write_text("merge_method: [ties\n")
    refuse(capsys, tmp, bad, "bad.yml", "not valid YAML")


def test_unknown_model_folder(zoo, capsys):
    tmp, base, models = zoo
    refuse(capsys, tmp, write_config(tmp, base, [tmp / "ghost"]), "ghost")


def test_cuda_refused_without_cuda(zoo, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tmp, base, models = zoo
    refuse(capsys, tmp, write_config(tmp, base, models), "CUDA is not available", extra_args=("--device", "cuda"))


def test_a_full_disk_leaves_nothing_behind(zoo):
    """A file-size limit makes writes fail as a full disk does; the merge says so and cleans up."""
    import subprocess
    import sys

    tmp, base, models = zoo
    config = write_config(tmp, base, models)
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from pcbmerge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "merge", str(config), str(tmp / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write output folder '{tmp / 'out'}'")
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.tmp-*"))


def test_an_error_about_a_model_listed_after_the_base_names_its_index_in_the_file(zoo, capsys):
    tmp, base, models = zoo
    path = tmp / "cfg.yml"
    path.write_text(
        yaml.safe_dump(
            {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(models[0]), "parameters": {"density": 0}}]}
        )
    )
    refuse(capsys, tmp, path, str(path), "models[1].parameters.density")
