"""The model zoo: layout, disjoint splits, lm-eval-loadable tasks, reproducible builds, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors import safe_open

from pcbcore.errors import MergeInputError
from pcbmerge.cli import main
from pipeline.zoo import PRESETS, build_zoo, load_zoo
from pipeline.zoo.build import SizePreset
from pipeline.zoo.problems import TaskSpec
from pipeline.zoo.training import ModelShape, TrainSettings

# A few optimiser steps on a very small model: enough to exercise every build step twice in seconds.
NANO = SizePreset(
    shape=ModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    task_spec=TaskSpec(letters="abcdefgh", min_len=3, max_len=4, n_words=10, max_words=3, n_polar_words=4),
    split_sizes={"test": 8, "validation": 8, "train": 32},
    pretrain=TrainSettings(steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=2),
    finetune=TrainSettings(steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=2),
)


def _tensor_names(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return sorted(handle.keys())


def test_micro_zoo_manifest_and_models(micro_zoo):
    manifest = json.loads((micro_zoo.root / "zoo.json").read_text())
    assert manifest["base"] == "base" and manifest["task_dir"] == "tasks"
    assert manifest["tasks"] == list(micro_zoo.experts) and len(manifest["tasks"]) >= 4
    assert all(not folder.startswith("/") for folder in manifest["experts"].values())
    kinds = set(manifest["task_kinds"].values())
    assert kinds == {"generate", "choice"}
    base_names = _tensor_names(micro_zoo.base)
    assert "lm_head.weight" in base_names  # untied: every weight is in the file
    for folder in micro_zoo.experts.values():
        assert _tensor_names(folder) == base_names
        assert (folder / "tokenizer.json").is_file()
        assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_splits_never_overlap(micro_zoo):
    for task in micro_zoo.tasks:
        prompts = {}
        for split in ("train", "validation", "test"):
            lines = (micro_zoo.task_dir / "data" / task / f"{split}.jsonl").read_text().splitlines()
            prompts[split] = {json.loads(line)["prompt"] for line in lines}
            assert len(prompts[split]) == len(lines) == micro_zoo.manifest.split_sizes[split]
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["validation"] & prompts["test"]


def test_every_task_yaml_loads_in_lm_eval(micro_zoo):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(micro_zoo.task_dir), include_defaults=False)
    loaded = manager.load_task_or_group(micro_zoo.tasks)
    assert sorted(loaded) == sorted(micro_zoo.tasks)
    output_types = set()
    for task in loaded.values():
        output_types.add(task.config.output_type)
        assert len(list(task.test_docs())) == micro_zoo.manifest.split_sizes["test"]
        assert len(list(task.validation_docs())) == micro_zoo.manifest.split_sizes["validation"]
    assert output_types == {"generate_until", "multiple_choice"}


def test_same_seed_same_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", NANO)
    first = load_zoo(build_zoo(tmp_path / "a", size="micro", seed=3)).manifest.weights_sha256
    second = load_zoo(build_zoo(tmp_path / "b", size="micro", seed=3)).manifest.weights_sha256
    other = load_zoo(build_zoo(tmp_path / "c", size="micro", seed=4)).manifest.weights_sha256
    assert first == second
    assert first["base"] != other["base"]
    assert len(set(first.values())) == len(first)  # every expert moved away from the base


def test_saved_hash_matches_reloaded_model(micro_zoo):
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation import model_content_hash

    model = AutoModelForCausalLM.from_pretrained(micro_zoo.experts["zoo_sort"])
    assert model_content_hash(model) == micro_zoo.manifest.weights_sha256["zoo_sort"]


def test_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "keep.txt").write_text("mine")
    with pytest.raises(MergeInputError, match="not empty"):
        build_zoo(tmp_path / "zoo", size="micro")
    assert main(["zoo", "build", str(tmp_path / "zoo"), "--size", "micro"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "zoo" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]  # no temporary folder left behind


def test_moved_zoo_points_its_tasks_at_the_new_place(micro_zoo, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(micro_zoo.root, moved)
    zoo = load_zoo(moved)
    config = yaml.safe_load((zoo.task_dir / f"{zoo.tasks[0]}.yaml").read_text())
    assert all(path.startswith(str(moved)) for path in config["dataset_kwargs"]["data_files"].values())


def test_load_zoo_without_manifest(tmp_path):
    with pytest.raises(MergeInputError, match="zoo.json"):
        load_zoo(tmp_path)
