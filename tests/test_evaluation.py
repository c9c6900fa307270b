"""lm-eval evaluation on the micro zoo: scores, in-memory vs saved, the result cache, bad input."""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pcbcore.errors import MergeInputError
from pcbmerge.cli import main
from pipeline.evaluation import EvalResult, TaskScore, evaluate_model, evaluate_path, model_content_hash


@pytest.fixture
def harness_calls(monkeypatch):
    """Counts calls to `lm_eval.simple_evaluate`; the real harness still runs."""
    calls = []
    real = lm_eval.simple_evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("tasks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    return calls


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_base_scores_low_and_each_expert_high_on_its_task(micro_zoo, tmp_path):
    common = dict(include_path=micro_zoo.task_dir, cache_dir=tmp_path)
    base = evaluate_path(micro_zoo.base, micro_zoo.tasks, **common)
    assert list(base.scores) == micro_zoo.tasks
    for task in micro_zoo.tasks:
        expert = evaluate_path(micro_zoo.experts[task], [task], **common).scores[task]
        assert expert.value >= base.scores[task].value + 0.4, (task, expert.value, base.scores[task].value)
    assert base.scores["zoo_reverse"].metric == "exact_match"
    assert base.scores["zoo_polarity"].metric == "acc"
    assert base.mean() < 0.35


def test_in_memory_equals_saved_and_reloaded(micro_zoo, tmp_path):
    model, tokenizer = _load(micro_zoo.experts["zoo_reverse"])
    with torch.no_grad():
        for parameter in model.parameters():  # a model that exists only in memory
            parameter.mul_(0.98)
    in_memory = evaluate_model(model, tokenizer, micro_zoo.tasks, include_path=micro_zoo.task_dir, cache_dir=tmp_path / "a")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded_model, _ = _load(tmp_path / "saved")
    assert model_content_hash(reloaded_model) == model_content_hash(model)
    from_disk = evaluate_path(tmp_path / "saved", micro_zoo.tasks, include_path=micro_zoo.task_dir, cache_dir=tmp_path / "b")
    assert from_disk == in_memory


def test_cache_hit_does_not_call_the_harness(micro_zoo, tmp_path, harness_calls):
    model, tokenizer = _load(micro_zoo.experts["zoo_sort"])
    args = dict(include_path=micro_zoo.task_dir, cache_dir=tmp_path, limit=8)
    first = evaluate_model(model, tokenizer, ["zoo_sort", "zoo_polarity"], **args)
    assert len(harness_calls) == 1
    again = evaluate_model(model, tokenizer, ["zoo_polarity", "zoo_sort"], **args)
    assert len(harness_calls) == 1
    assert again.scores == first.scores
    evaluate_model(model, tokenizer, ["zoo_sort"], split="validation", **args)
    assert len(harness_calls) == 2  # another split is another result
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    evaluate_model(model, tokenizer, ["zoo_sort"], **args)
    assert len(harness_calls) == 3  # other weights, other result


def test_validation_and_test_splits_differ(micro_zoo, tmp_path):
    model, tokenizer = _load(micro_zoo.base)
    args = dict(include_path=micro_zoo.task_dir, cache_dir=tmp_path)
    test = evaluate_model(model, tokenizer, ["zoo_translate"], split="test", **args)
    validation = evaluate_model(model, tokenizer, ["zoo_translate"], split="validation", **args)
    assert test.scores["zoo_translate"].value != validation.scores["zoo_translate"].value


def test_evaluation_writes_only_into_its_cache(micro_zoo, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    model, tokenizer = _load(micro_zoo.base)
    evaluate_model(model, tokenizer, ["zoo_reverse"], include_path=micro_zoo.task_dir, cache_dir=tmp_path / "cache", limit=4)
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cwd"]
    assert (tmp_path / "cache" / "hf_datasets").is_dir()


def test_cli_json_prints_only_the_scores(micro_zoo, tmp_path, capsys):
    code = main(
        [
            "eval",
            str(micro_zoo.experts["zoo_polarity"]),
            "--tasks",
            "zoo_polarity,zoo_sort",
            "--include-path",
            str(micro_zoo.task_dir),
            "--json",
            "--cache-dir",
            str(tmp_path),
            "--limit",
            "8",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["zoo_polarity", "zoo_sort"]
    assert set(printed["zoo_polarity"]) == {"metric", "value", "stderr"}
    assert printed["zoo_polarity"]["metric"] == "acc"


def test_cli_table(micro_zoo, tmp_path, capsys):
    code = main(
        [
            "eval",
            str(micro_zoo.base),
            "--tasks",
            "zoo_sort",
            "--include-path",
            str(micro_zoo.task_dir),
            "--cache-dir",
            str(tmp_path),
            "--limit",
            "4",
            "--split",
            "validation",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "zoo_sort" in out and "exact_match" in out and "mean" in out


def test_unknown_task_lists_the_existing_ones(micro_zoo, tmp_path):
    model, tokenizer = _load(micro_zoo.base)
    with pytest.raises(MergeInputError, match="unknown task.*zoo_nope.*zoo_reverse"):
        evaluate_model(model, tokenizer, ["zoo_nope"], include_path=micro_zoo.task_dir, cache_dir=tmp_path)


def test_unloadable_model_folder_says_why(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MergeInputError, match="cannot load the model folder"):
        evaluate_path(tmp_path, ["zoo_sort"], cache_dir=tmp_path / "cache")
    assert main(["eval", str(tmp_path / "absent"), "--tasks", "zoo_sort", "--cache-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_limit_must_be_positive(micro_zoo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(micro_zoo.base), "--tasks", "zoo_sort", "--limit", "0"])
    assert exited.value.code == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    model, tokenizer = _load(micro_zoo.base)
    with pytest.raises(MergeInputError, match="limit"):
        evaluate_model(model, tokenizer, ["zoo_sort"], include_path=micro_zoo.task_dir, limit=-3, cache_dir=tmp_path)
    with pytest.raises(MergeInputError, match="split"):
        evaluate_model(model, tokenizer, ["zoo_sort"], include_path=micro_zoo.task_dir, split="train", cache_dir=tmp_path)


def test_content_hash_follows_the_weights(micro_zoo):
    model, _ = _load(micro_zoo.base)
    before = model_content_hash(model)
    assert model_content_hash(model) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert model_content_hash(model) != before


def test_eval_result_json_table_and_mean():
    result = EvalResult(
        scores={
            "a": TaskScore(metric="acc", value=0.5, stderr=0.1),
            "b": TaskScore(metric="exact_match", value=1.0, stderr=None),
        }
    )
    assert result.mean() == pytest.approx(0.75)
    assert result.to_json() == {
        "a": {"metric": "acc", "value": 0.5, "stderr": 0.1},
        "b": {"metric": "exact_match", "value": 1.0, "stderr": None},
    }
    table = result.format_table()
    assert "0.7500" in table and "-" in table.splitlines()[-2]
