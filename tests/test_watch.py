"""watch-flow: merge once for a new set of checkpoints, nothing on the next run, again when one is added;
the comparison comes from MLflow lineage. Real Prefect engine (test harness), real SQLite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pcbcore.errors import MergeInputError
from pcbmerge.cli import main

SECRET = "hf_watchtestsecret0123456789"


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def watched(micro_zoo, tmp_path_factory):
    """A source folder with two experts and a pipeline YAML that names no models (the source supplies them)."""
    root = tmp_path_factory.mktemp("watch")
    source = root / "incoming"
    source.mkdir()
    for task in micro_zoo.tasks[:2]:
        shutil.copytree(micro_zoo.experts[task], source / task)
    (source / ".partial-upload").mkdir()  # hidden: never a checkpoint
    config = root / "watch.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(micro_zoo.base), "register_as": "watched"}))
    return {"root": root, "source": source, "config": config}


def _watch(capsys, watched) -> dict:
    capsys.readouterr()
    assert main(["watch", str(watched["config"]), "--source", str(watched["source"]), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_watch_merges_only_when_the_set_changes(watched, micro_zoo, capsys, monkeypatch):
    from pipeline.registry import read_lineage
    from pipeline.tracking import client

    monkeypatch.setenv("HF_TOKEN", SECRET)  # a token in the environment must never reach params, tags or logs
    source = watched["source"]

    first = _watch(capsys, watched)
    assert first["merged"] is True and first["model"] == "models:/watched/1"
    assert first["inputs"] == [str(source / t) for t in micro_zoo.tasks[:2]]

    again = _watch(capsys, watched)
    assert again == {"merged": False, "model": None, "inputs": first["inputs"]}

    # The same checkpoints copied under another folder are the same merge: content decides, not paths.
    elsewhere = watched["root"] / "elsewhere"
    for task in micro_zoo.tasks[:2]:
        shutil.copytree(source / task, elsewhere / task)
    capsys.readouterr()
    assert main(["watch", str(watched["config"]), "--source", str(elsewhere), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["merged"] is False and moved["model"] is None

    added = micro_zoo.tasks[2]
    shutil.copytree(micro_zoo.experts[added], source / added)
    second = _watch(capsys, watched)
    assert second["merged"] is True and second["model"] == "models:/watched/2"

    lineage = read_lineage("models:/watched/2")
    merged = {item["ref"] for item in lineage["inputs"] if item["role"] == "model"}
    assert merged == {str(source / t) for t in micro_zoo.tasks[:3]}
    assert str(source / added) in merged and lineage["inputs"][0] == {**lineage["inputs"][0], "role": "base", "ref": str(micro_zoo.base)}

    # Only two versions exist: the unchanged run registered nothing.
    versions = client().search_model_versions("name = 'watched'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    _assert_secret_nowhere(client(), [v.run_id for v in versions])

    # A registered model is a source too: one checkpoint per version.
    from tasks.discover import discover_checkpoints

    found = discover_checkpoints.fn("models:/watched", str(watched["root"] / "cache"))
    assert [(c.ref, c.identity) for c in found] == [("models:/watched/1", "watched/1"), ("models:/watched/2", "watched/2")]


def test_watch_sees_a_checkpoint_updated_in_place(watched, micro_zoo, capsys):
    """Same folder names, new weights: the fingerprint changed, so it merges (after the test above)."""
    from pipeline.registry import read_lineage

    target = watched["source"] / micro_zoo.tasks[0]
    shutil.rmtree(target)
    shutil.copytree(micro_zoo.experts[micro_zoo.tasks[3]], target)  # other weights under the old name
    outcome = _watch(capsys, watched)
    assert outcome["merged"] is True and outcome["model"] == "models:/watched/3"
    before = {i["ref"]: i["fingerprint"] for i in read_lineage("models:/watched/2")["inputs"]}
    after = {i["ref"]: i["fingerprint"] for i in read_lineage("models:/watched/3")["inputs"]}
    assert before.keys() == after.keys() and before[str(target)] != after[str(target)]
    assert _watch(capsys, watched)["merged"] is False


def _assert_secret_nowhere(mlflow_client, run_ids):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    for run_id in run_ids:
        run = mlflow_client.get_run(run_id)
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    with get_client(sync_client=True) as prefect_client:
        runs = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="")))
        assert runs
        assert SECRET not in json.dumps([r.parameters for r in runs], default=str)
        logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        assert logs and SECRET not in "\n".join(log.message for log in logs)


def test_hub_source_reads_branches_from_the_local_cache(micro_zoo, tmp_path):
    """Offline (HF_HUB_OFFLINE=1 in conftest), a Hub repo's branches come from the cache; the identity a
    discovery reports is the revision `fetch_checkpoint` records for the same ref."""
    from huggingface_hub import constants

    from tasks.discover import discover_checkpoints
    from tasks.fetch import fetch_checkpoint

    repo = Path(constants.HF_HUB_CACHE) / "models--acme--tiny-experts"
    commits = {"main": "a" * 40, "sort": "b" * 40}
    (repo / "refs").mkdir(parents=True)
    for (branch, commit), task in zip(commits.items(), micro_zoo.tasks):
        shutil.copytree(micro_zoo.experts[task], repo / "snapshots" / commit)
        (repo / "refs" / branch).write_text(commit)
    found = discover_checkpoints.fn("acme/tiny-experts", str(tmp_path / "cache"))
    assert [(c.ref, c.identity) for c in found] == [("acme/tiny-experts@main", "a" * 40), ("acme/tiny-experts@sort", "b" * 40)]
    fetched = fetch_checkpoint.fn("acme/tiny-experts@sort", str(tmp_path / "cache"))
    assert fetched.revision == found[1].identity


@pytest.mark.parametrize(
    "yaml_text, source, message",
    [
        ("merge_method: linear\nbase_model: /x\n", "SRC", "needs key 'register_as'"),
        ("merge_method: linear\nbase_model: /x\nregister_as: w\n", "models:/w", "would merge its own output"),
        ("merge_method: linear\nbase_model: /x\nregister_as: w\n", "/no/such/folder", "is not a folder, a Hub repo id"),
        ("merge_method: lin\nbase_model: /x\nregister_as: w\n", "SRC", "unknown merge method 'lin'"),
    ],
)
def test_watch_bad_input_is_one_sentence(tmp_path, capsys, yaml_text, source, message):
    config = tmp_path / "w.yml"
    config.write_text(yaml_text)
    assert main(["watch", str(config), "--source", str(tmp_path) if source == "SRC" else source]) == 2
    assert message in capsys.readouterr().err


def test_every_must_be_an_interval(tmp_path, capsys):
    config = tmp_path / "w.yml"
    config.write_text("merge_method: linear\nbase_model: /x\nregister_as: w\n")
    assert main(["watch", str(config), "--source", str(tmp_path), "--every", "soon"]) == 2
    assert "--every 'soon' is not an interval" in capsys.readouterr().err


def test_watch_config_errors_raise(tmp_path):
    from pipeline.watch_config import load_watch_config

    with pytest.raises(MergeInputError, match="does not exist"):
        load_watch_config(tmp_path / "missing.yml", str(tmp_path))


def test_a_lora_base_is_the_same_merge_for_the_watch_and_for_its_lineage(micro_zoo, tmp_path):
    """A watched merge whose base is `model+lora`: the identity the watch wants and the one read back from a
    registered version's lineage (base + adapter as two inputs) agree, so an unchanged source is not merged
    again; another adapter is another identity."""
    from builders import save_lora_adapter

    from pipeline.discovery import lineage_identity, merge_identity, reference_identity
    from pipeline.references import fetch

    cache = tmp_path / "cache"
    expert = next(iter(micro_zoo.experts.values()))
    lora = save_lora_adapter(micro_zoo.base, tmp_path / "lora", seed=1)
    base, adapter, model = (fetch(str(p), cache) for p in (micro_zoo.base, lora, expert))
    lineage = {
        "method": "task_arithmetic",
        "parameters": {},
        "inputs": [
            {"role": "base", "ref": base.ref, "fingerprint": base.fingerprint, "adapter": adapter.ref},
            {"role": "model", "ref": model.ref, "fingerprint": model.fingerprint, "parameters": {"weight": 1.0}},
            {"role": "lora", "ref": adapter.ref, "fingerprint": adapter.fingerprint, "applied_to": base.ref},
        ],
    }
    lora_base = reference_identity(f"{micro_zoo.base}+{lora}", cache)
    assert lineage_identity(lineage) == merge_identity("task_arithmetic", {}, lora_base, [(reference_identity(str(expert), cache), {"weight": 1.0})])
    other = save_lora_adapter(micro_zoo.base, tmp_path / "other", seed=2)
    assert reference_identity(f"{micro_zoo.base}+{other}", cache) != lora_base != reference_identity(str(micro_zoo.base), cache)
