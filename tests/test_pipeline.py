"""merge-flow end to end on the micro zoo: the real Prefect engine (test harness), a real SQLite MLflow
store under the session's PCBMERGE_HOME, real lm-eval. Covers tracking, the registry and lineage, caches
on a re-run, a merge of a registered merge, a flaky fetch that is retried, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcbcore.errors import MergeInputError
from pipeline.config import parse_pipeline_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def mlflow_client():
    from pipeline.tracking import client

    return client()


def _config(zoo, **overrides):
    data = {
        "merge_method": "ties",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks[:2]],
        "parameters": {"density": 0.5},
        "evaluation": {"tasks": zoo.tasks[:2], "include_path": str(zoo.task_dir), "limit": 4, "baselines": True},
    }
    data.update(overrides)
    return parse_pipeline_config({k: v for k, v in data.items() if v is not None}, source="test")


def _task_run_states(flow_run_id) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect_client:
        runs = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.split(" ")[0], []).append(run.state.name)
    return states


@pytest.fixture(scope="module")
def first_merge(micro_zoo):
    """One registered merge (run twice: the second run must come from the caches)."""
    from flows.merge import merge_flow

    config = _config(micro_zoo, register_as="pipeline-ties")
    first = merge_flow(config, return_state=True)
    second = merge_flow(config, return_state=True)
    return config, first, second


def test_flow_tracks_registers_and_records_lineage(first_merge, micro_zoo, mlflow_client):
    config, state, _ = first_merge
    outcome = state.result()
    assert outcome.model_uri == "models:/pipeline-ties/1"
    assert set(outcome.scores) == {"base", *micro_zoo.tasks[:2], "merged"}
    assert not outcome.reused and (Path(outcome.folder) / "model.safetensors").is_file()

    version = mlflow_client.get_model_version("pipeline-ties", "1")
    assert version.run_id == outcome.run_id
    tags = version.tags
    assert tags["pcbmerge.method"] == "ties"
    assert json.loads(tags["pcbmerge.parameters"])["scope"] == "tensor"
    assert tags["pcbmerge.input.0.role"] == "base" and tags["pcbmerge.input.0.ref"] == str(micro_zoo.base)
    assert tags["pcbmerge.input.1.ref"] == str(micro_zoo.experts[micro_zoo.tasks[0]])
    assert len(tags["pcbmerge.input.1.fingerprint"]) == 64
    assert tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert "ties" in version.description

    run = mlflow_client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.params["merge_method"] == "ties" and run.data.params["models.0.parameters.density"] == "0.5"
    task = micro_zoo.tasks[0]
    assert run.data.metrics[f"merged.{task}"] == pytest.approx(outcome.scores["merged"][task])
    assert f"base.{task}" in run.data.metrics and f"{task}.{task}" in run.data.metrics
    artifacts = {a.path for a in mlflow_client.list_artifacts(outcome.run_id)}
    assert {"lineage.json", "merge_config.yml", "results.md", "results.csv", "scores.png"} <= artifacts

    from pipeline.registry import read_lineage

    node = read_lineage("models:/pipeline-ties/1")
    assert node["model"] == "models:/pipeline-ties/1" and node["method"] == "ties" and node["run_id"] == outcome.run_id
    assert [i["role"] for i in node["inputs"]] == ["base", "model", "model"]
    assert all(i["lineage"] is None and len(i["fingerprint"]) == 64 for i in node["inputs"])
    assert node["inputs"][1]["parameters"]["density"] == 0.5


def test_rerun_hits_the_caches(first_merge, mlflow_client):
    _, first, second = first_merge
    again = second.result()
    assert again.reused and again.fingerprint == first.result().fingerprint
    assert again.scores == first.result().scores
    # The registry is keyed by content: the same bytes are the same version, registered (and stored) once.
    assert again.model_uri == first.result().model_uri == "models:/pipeline-ties/1"
    assert [str(v.version) for v in mlflow_client.search_model_versions("name='pipeline-ties'")] == ["1"]
    assert mlflow_client.get_run(again.run_id).data.tags["pcbmerge.registered_version_matched"] == "true"
    states = _task_run_states(second.state_details.flow_run_id)
    assert set(states["evaluate"]) == {"Cached"}, states  # no second evaluation
    assert states["merge"] in (["Cached"], ["Completed"])  # Completed = reused the finished folder, no merge
    assert set(states["fetch"]) == {"Cached"}


def test_merge_of_a_registered_merge_has_two_level_lineage(first_merge, micro_zoo, capsys):
    from flows.merge import merge_flow
    from pcbmerge.cli import main

    config = _config(
        micro_zoo,
        merge_method="task_arithmetic",
        parameters={"lambda": 0.5},
        models=[{"model": "models:/pipeline-ties/1"}, {"model": str(micro_zoo.experts[micro_zoo.tasks[2]])}],
        evaluation=None,
        register_as="pipeline-merge-of-merge",
    )
    outcome = merge_flow(config)
    assert outcome.model_uri == "models:/pipeline-merge-of-merge/1"

    assert main(["lineage", outcome.model_uri, "--format", "json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["model"] == outcome.model_uri and tree["method"] == "task_arithmetic"
    parent = tree["inputs"][1]
    assert parent["ref"] == "models:/pipeline-ties/1" and parent["registered"] == {"name": "pipeline-ties", "version": "1"}
    assert parent["lineage"]["model"] == "models:/pipeline-ties/1" and parent["lineage"]["method"] == "ties"
    assert all(i["lineage"] is None for i in parent["lineage"]["inputs"])
    assert parent["fingerprint"] == first_merge[1].result().fingerprint  # the downloaded files are the merge's

    assert main(["lineage", outcome.model_uri]) == 0
    text = capsys.readouterr().out
    assert "models:/pipeline-merge-of-merge/1" in text and "models:/pipeline-ties/1  ties" in text


def test_a_fetch_that_fails_twice_is_retried_and_the_flow_completes(micro_zoo, monkeypatch):
    from flows.merge import merge_flow
    from pipeline import references
    from pipeline.retry import TransientFetchError

    attempts = []

    def flaky(ref: str, cache_dir: Path) -> references.Resolved:
        attempts.append(ref)
        if len(attempts) < 3:
            raise TransientFetchError(f"{ref}: source not reachable (try {len(attempts)})")
        return references.Resolved(Path(micro_zoo.experts[micro_zoo.tasks[1]]))

    sources = [references.Source("flaky", lambda ref: ref.startswith("flaky:"), flaky), *references.SOURCES]
    monkeypatch.setattr(references, "SOURCES", sources)
    config = _config(
        micro_zoo,
        merge_method="task_arithmetic",
        parameters={"lambda": 0.3},
        models=[{"model": str(micro_zoo.experts[micro_zoo.tasks[0]])}, {"model": "flaky:expert"}],
        evaluation=None,
    )
    outcome = merge_flow(config)
    assert attempts == ["flaky:expert"] * 3
    assert (Path(outcome.folder) / "model.safetensors").is_file() and outcome.model_uri is None


def test_a_reference_to_nothing_fails_fast_naming_it(micro_zoo, tmp_path, mlflow_client):
    from flows.merge import merge_flow

    out = tmp_path / "never"
    config = _config(
        micro_zoo,
        models=[{"model": str(micro_zoo.experts[micro_zoo.tasks[0]])}, {"model": "models:/no-such-model/3"}],
        register_as="pipeline-never",
        output=str(out),
    )
    with pytest.raises(MergeInputError, match="models:/no-such-model/3"):
        merge_flow(config)
    assert not out.exists()
    assert not mlflow_client.search_model_versions("name='pipeline-never'")


def test_incompatible_checkpoints_are_refused_before_merging(micro_zoo, tiny_zoo, tmp_path, mlflow_client):
    from flows.merge import merge_flow

    out = tmp_path / "never"
    tiny_base, tiny_models = tiny_zoo
    config = _config(micro_zoo, models=[{"model": str(tiny_models[0])}], register_as="pipeline-mismatch", output=str(out))
    with pytest.raises(MergeInputError, match="shape|missing|model_type|architectures"):
        merge_flow(config)
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    assert not mlflow_client.search_model_versions("name='pipeline-mismatch'")
    failed = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("pcbmerge").experiment_id], "attributes.status = 'FAILED'")
    assert failed  # the flow's MLflow run is closed as FAILED


def test_pipeline_config_names_bad_keys(micro_zoo):
    with pytest.raises(MergeInputError, match="'evaluation.taks'"):
        _config(micro_zoo, evaluation={"taks": ["x"]})
    with pytest.raises(MergeInputError, match="'registr_as'"):
        parse_pipeline_config({"merge_method": "ties", "base_model": "a", "models": [{"model": "b"}], "registr_as": "x"})
    with pytest.raises(MergeInputError, match="'parameters.densty'"):
        _config(micro_zoo, parameters={"densty": 0.5})
    with pytest.raises(MergeInputError, match="'evaluation.limit'"):
        _config(micro_zoo, evaluation={"tasks": ["x"], "limit": 0})
    for name in ("team/merge", "merge@best", "merge-1.0", ""):  # MLflow would refuse '.' only at registration
        with pytest.raises(MergeInputError, match="'register_as': must be a non-empty name without"):
            _config(micro_zoo, register_as=name)


def test_components_are_stored_once_per_recipe(micro_zoo):
    """The search's components task: keyed on inputs and method parameters, not on λ."""
    from prefect import flow

    from pcbcore.components import StoredComponents
    from pipeline.settings import load_settings
    from tasks.components import compute_components
    from tasks.fetch import fetch_checkpoint

    @flow
    def components_twice(config_a, config_b):
        cache = str(load_settings().cache_dir)
        inputs = {ref: fetch_checkpoint(ref, cache) for ref in config_a.references()}
        return compute_components(config_a, inputs, cache, "cpu"), compute_components(config_b, inputs, cache, "cpu")

    a = _config(micro_zoo, merge_method="pcb", parameters={"ratio": 0.2}, evaluation=None)
    b = _config(micro_zoo, merge_method="pcb", parameters={"ratio": 0.2, "lambda": 0.7}, evaluation=None)
    first, second = components_twice(a, b)
    assert not first.reused and second.reused and first.folder == second.folder
    state = StoredComponents(first.folder, device="cpu").state_dict([0.0, 0.0])
    assert state  # λ = 0 gives the base; the engine's own tests check the values


def test_a_lora_reference_is_fetched_merged_and_scored_with_its_adapter(micro_zoo, tmp_path, mlflow_client):
    """`model+lora` in the pipeline: the model and the adapter are two fingerprinted inputs in the lineage, the
    merge is `pcbmerge merge`'s (adapter applied), the baseline scores the adapted model (written once into
    the cache), and another adapter is another merge."""
    from builders import save_lora_adapter
    from safetensors.torch import load_file

    from flows.merge import merge_flow
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_to_folder
    from pcbcore.lora import open_model
    from pipeline.outputs import adapted_folder, finished_merge, output_folder
    from pipeline.references import fetch
    from pipeline.registry import read_lineage
    from pipeline.settings import load_settings

    expert, other = (micro_zoo.experts[t] for t in micro_zoo.tasks[:2])
    lora = save_lora_adapter(expert, tmp_path / "lora", seed=5)
    ref = f"{expert}+{lora}"
    models = [{"model": ref, "parameters": {"weight": 1.0}}, {"model": str(other), "parameters": {"weight": 0.5}}]
    evaluation = {"tasks": micro_zoo.tasks[:1], "include_path": str(micro_zoo.task_dir), "limit": 2, "baselines": True}
    config = _config(micro_zoo, merge_method="task_arithmetic", parameters={}, models=models, evaluation=evaluation, register_as="pipeline-lora")
    assert config.references() == [str(micro_zoo.base), str(expert), str(lora), str(other)]
    outcome = merge_flow(config)

    merged = load_file(Path(outcome.folder) / "model.safetensors")
    direct = merge_to_folder(parse_merge_config(config.merge_data()), tmp_path / "direct", device="cpu")
    assert merged.keys() == (expected := load_file(Path(direct.out_dir) / "model.safetensors")).keys()
    assert all(torch_equal(merged[k], expected[k]) for k in merged)
    assert set(outcome.scores) == {"base", f"{Path(expert).name}_lora", Path(other).name, "merged"}

    cache = str(load_settings().cache_dir)
    inputs = {r: fetch(r, cache) for r in config.references()}
    _, adapted = adapted_folder(ref, inputs, cache)
    assert finished_merge(adapted, adapted_folder(ref, inputs, cache)[0])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch_equal(load_file(adapted / "model.safetensors")[q], open_model(ref).read(q))

    node = read_lineage(outcome.model_uri)
    assert [i["role"] for i in node["inputs"]] == ["base", "model", "model", "lora"]
    assert node["inputs"][1]["ref"] == str(expert) and node["inputs"][1]["adapter"] == str(lora)
    assert node["inputs"][3]["ref"] == str(lora) and node["inputs"][3]["applied_to"] == str(expert)
    assert node["inputs"][3]["fingerprint"] == inputs[str(lora)].fingerprint
    tags = mlflow_client.get_model_version("pipeline-lora", "1").tags
    assert tags["pcbmerge.input.3.role"] == "lora" and tags["pcbmerge.input.1.adapter"] == str(lora)

    other_lora = save_lora_adapter(expert, tmp_path / "lora2", seed=6)
    second = _config(micro_zoo, merge_method="task_arithmetic", parameters={}, models=[{**models[0], "model": f"{expert}+{other_lora}"}, models[1]])
    second_inputs = {r: fetch(r, cache) for r in second.references()}
    assert output_folder(second, second_inputs, cache)[0] != output_folder(config, inputs, cache)[0]


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_relative_model_plus_lora_parts_are_anchored_to_the_yaml_folder(tmp_path, monkeypatch):
    from pipeline.config import load_pipeline_config

    for name in ("base", "ft", "lora"):
        (tmp_path / name).mkdir()
    (tmp_path / "merge.yml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft+lora\n")
    monkeypatch.chdir("/")
    config = load_pipeline_config(tmp_path / "merge.yml")
    assert config.models[0].model == f"{tmp_path / 'ft'}+{tmp_path / 'lora'}"
    assert config.references() == [str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "lora")]
