"""The deployments' forms, checked with Prefect's own schema validator (what the UI's "Validate" and a run's
creation use): a select of methods, one field set per method, a typo or an out-of-range value refused at its
field; local paths absolute whatever the working folder; what a run's pages render (links, lineage, the
parameters that apply); the scores chart; the quiet console."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pcbcore.methods import METHODS
from pipeline.config import PipelineConfig, load_pipeline_config, parse_pipeline_config

BASE = {"merge_method": "pcb", "base_model": "/models/base", "models": [{"model": "/models/a"}, {"model": "/models/b"}]}


def _schema(flow) -> dict:
    return flow.to_deployment(name="form")._parameter_openapi_schema.model_dump()


def _errors(schema: dict, parameters: dict) -> dict:
    from prefect.utilities.schema_tools.validation import build_error_obj, validate

    return build_error_obj(validate(parameters, schema, preprocess=False))


def _at(errors: dict, *path) -> list[str]:
    """The messages at `path` (property names and list indexes) of Prefect's error object."""
    level = errors["errors"]
    for part in path:
        key = "index" if isinstance(part, int) else "property"
        level = next((entry["errors"] for entry in level if isinstance(entry, dict) and entry.get(key) == part), None)
        if level is None:
            return []
    return [m for m in level if isinstance(m, str)]


@pytest.fixture(scope="module")
def merge_schema():
    from flows.merge import merge_flow

    return _schema(merge_flow)


def test_merge_method_is_a_select_and_parameters_one_field_set_per_method(merge_schema):
    form = merge_schema["definitions"]["PipelineConfig"]["properties"]
    assert form["merge_method"]["enum"] == list(METHODS)
    sets = {option["title"]: option for option in form["parameters"]["anyOf"]}
    assert list(sets) == list(METHODS)
    assert set(sets["pcb"]["properties"]) == {"ratio", "variant", "scope", "clip_quantile", "lambda"}
    assert sets["pcb"]["properties"]["variant"]["enum"] == ["paper", "release"]
    assert {"density", "weight", "normalize"} <= set(sets["ties"]["properties"]) and "ratio" not in sets["ties"]["properties"]
    for option in sets.values():
        assert all(spec.get("description") and (spec.get("type") or spec.get("anyOf")) for spec in option["properties"].values()), option["title"]
    per_model = form["models"]["items"]["properties"]["parameters"]["properties"]
    assert {"lambda", "weight", "density"} <= set(per_model) and all(spec.get("description") for spec in per_model.values())


@pytest.mark.parametrize(
    "change, path, message",
    [
        ({"parameters": {"ratoi": 0.2}}, ("config", "parameters"), "'ratoi' was unexpected"),
        ({"parameters": {"ratio": 1.5}}, ("config", "parameters", "ratio"), "1.5 is greater than the maximum of 1"),
        ({"parameters": {"density": 0.5}}, ("config", "parameters"), "'density' was unexpected"),  # a TIES key under PCB
        ({"merge_method": "pcbb"}, ("config", "merge_method"), "'pcbb' is not one of"),
        ({"evaluation": {"tasks": ["t"], "limit": 0}}, ("config", "evaluation", "limit"), "0 is less than or equal to the minimum of 0"),
        ({"models": [{"model": "/a", "parameters": {"density": 2}}], "merge_method": "ties"}, ("config", "models", 0, "parameters", "density"), "2 is greater"),
    ],
)
def test_a_bad_value_is_refused_at_its_field(merge_schema, change, path, message):
    errors = _errors(merge_schema, {"config": {**BASE, **change}})
    assert not errors["valid"]
    assert any(message in m for m in _at(errors, *path)), errors


def test_good_values_pass_the_form(merge_schema):
    from pydantic import ValidationError

    from pipeline.forms import parameters_model

    for name in METHODS:  # the form accepts empty parameters exactly where the method needs none (slerp needs its t)
        try:
            parameters_model(name).model_validate({})
            needed = False
        except ValidationError:
            needed = True
        assert _errors(merge_schema, {"config": {**BASE, "merge_method": name, "parameters": {}}})["valid"] is not needed, name
    assert _errors(merge_schema, {"config": {**BASE, "parameters": {"ratio": 0.3, "variant": "release", "clip_quantile": 0.01}}})["valid"]
    assert _errors(merge_schema, {"config": {**BASE, "evaluation": None}})["valid"]


def test_search_and_watch_forms_name_the_field():
    from flows.search import search_flow
    from flows.watch import watch_flow

    search = {"config": {**BASE, "evaluation": {"tasks": ["t"]}, "search": {"popsize": 1}}}
    assert "1 is less than the minimum of 2" in _at(_errors(_schema(search_flow), search), "config", "search", "popsize")
    assert "'ratoi' was unexpected" in str(_errors(_schema(search_flow), {"config": {**BASE, "parameters": {"ratoi": 1}, "evaluation": {"tasks": ["t"]}}}))
    watch = {"config": {"source": "/x", "pipeline": {"merge_method": "pcb", "register_as": "w"}, "search": {"budget": 0}}}
    assert "0 is less than the minimum of 1" in _at(_errors(_schema(watch_flow), watch), "config", "search", "budget")


def test_python_side_names_the_key_too():
    with pytest.raises(ValueError, match=r"unknown key 'parameters.ratoi' for merge method 'pcb'"):
        PipelineConfig.model_validate({**BASE, "parameters": {"ratoi": 0.1}})
    with pytest.raises(ValueError, match=r"key 'parameters.ratio'"):
        PipelineConfig.model_validate({**BASE, "parameters": {"ratio": 2}})


def test_local_paths_are_absolute_whatever_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "zoo" / "base").mkdir(parents=True)
    (tmp_path / "zoo" / "a").mkdir()
    (tmp_path / "tasks").mkdir()
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: linear\nbase_model: zoo/base\nmodels: [{model: zoo/a}, {model: org/hub-model}, {model: 'models:/m/1'}]\n"
        "evaluation: {tasks: [t], include_path: tasks}\noutput: out/merged\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_pipeline_config(config)
    assert loaded.base_model == str(tmp_path / "zoo" / "base")
    assert [m.model for m in loaded.models] == [str(tmp_path / "zoo" / "a"), "org/hub-model", "models:/m/1"]  # Hub ids and models:/ stay
    assert loaded.evaluation.include_path == str(tmp_path / "tasks")
    assert loaded.output == str(elsewhere / "out" / "merged")
    # A form or the API: relative paths are taken from the working folder of the process that validates it.
    monkeypatch.chdir(tmp_path)
    typed = PipelineConfig.model_validate({"merge_method": "linear", "base_model": "zoo/base", "models": [{"model": "zoo/a"}]})
    assert typed.base_model == str(tmp_path / "zoo" / "base") and typed.models[0].model == str(tmp_path / "zoo" / "a")
    assert (
        parse_pipeline_config({"merge_method": "linear", "base_model": "zoo/base", "models": [{"model": "zoo/a"}], "tokenizer_source": "base"}).tokenizer_source
        == "base"
    )


NODE = {
    "model": "models:/m/3",
    "method": "pcb",
    "parameters": {"ratio": 0.1, "variant": "paper", "scope": "model", "clip_quantile": 0.0001},
    "lambdas": [1.1, 0.9],
    "fingerprint": "f" * 64,
    "run_id": "abc",
    "flow_run_id": None,
    "inputs": [
        {"role": "base", "ref": "/zoo/base", "source": "local", "revision": None, "fingerprint": "1" * 64, "registered": None, "parameters": None},
        {
            "role": "model",
            "ref": "org/expert@main",
            "source": "hub",
            "revision": "c" * 40,
            "fingerprint": "2" * 64,
            "registered": None,
            "parameters": {"lambda": 1.1},
        },
        {
            "role": "model",
            "ref": "models:/earlier/2",
            "source": "registry",
            "revision": "earlier/2",
            "fingerprint": "3" * 64,
            "registered": {"name": "earlier", "version": "2"},
            "parameters": {"lambda": 0.9},
        },
    ],
}


def test_version_description_and_tags_show_only_what_applies(monkeypatch):
    from pipeline.lineage import lineage_description, lineage_tags

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    description, tags = lineage_description(NODE), lineage_tags(NODE)
    assert "None" not in description and "None" not in str(tags) and "clip_quantile" not in description + str(tags)
    assert "[models:/earlier/2](http://127.0.0.1:5000/#/models/earlier/versions/2)" in description
    assert f"(https://huggingface.co/org/expert/tree/{'c' * 40})" in description
    assert "λ = [1.1, 0.9]" in description and "ratio = 0.1" in description
    assert tags["pcbmerge.input.2.link"] == "http://127.0.0.1:5000/#/models/earlier/versions/2"
    assert "pcbmerge.input.0.revision" not in tags and "prefect.flow_run_id" not in tags
    release = {**NODE, "parameters": {**NODE["parameters"], "variant": "release"}}
    assert "clip_quantile = 0.0001" in lineage_description(release)


def test_links_and_lineage_graph():
    from pipeline.report import lineage_mermaid, links_markdown, run_url

    assert run_url("http://h:5000/", "7", "r1") == "http://h:5000/#/experiments/7/runs/r1"
    assert run_url("sqlite:///x.db", "7", "r1") is None
    local = links_markdown("sqlite:///x.db", "7", "r1", "models:/m/1", "/out/m")
    assert "`r1` in `sqlite:///x.db`" in local and "`models:/m/1`" in local and "`/out/m`" in local
    served = links_markdown("http://h:5000", "7", "r1", "models:/m/1", None)
    assert "[r1](http://h:5000/#/experiments/7/runs/r1)" in served and "(http://h:5000/#/models/m/versions/1)" in served
    graph = lineage_mermaid(
        {
            **NODE,
            "inputs": [NODE["inputs"][0], {**NODE["inputs"][2], "lineage": {**NODE, "model": "models:/earlier/2", "inputs": NODE["inputs"][:1]}}],
            "lambdas": [0.9],
        }
    )
    assert graph.startswith("```mermaid\ngraph LR") and "-->|λ=0.9|" in graph and "-->|base|" in graph
    assert graph.count("models:/earlier/2") == 1 and "clip_quantile" not in graph


def test_scores_chart_draws_a_zero_and_labels_values(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import draw_score_bars

    fig, ax = plt.subplots()
    bars = draw_score_bars(ax, {"base": {"a": 0.0, "b": 0.5}, "merged": {"a": 0.75}})
    heights = [[bar.get_height() for bar in group] for group in bars]
    assert len(heights[0]) == 2 and heights[0][0] > 0 and len(heights[1]) == 1  # a 0 is drawn; a missing score is not
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["0.00", "0.50", "0.75"]
    plt.close(fig)


def test_the_console_stays_quiet(tmp_path):
    """In a folder that is not a git repository, lm-eval's git call prints nothing, and tqdm bars are off."""
    check = (
        "from pcbmerge import console; console.configure(False)\n"
        "import lm_eval.evaluator as e, tqdm, sys\n"
        "assert e.get_git_commit_hash() is None\n"
        "for _ in tqdm.tqdm(range(3), desc='Running loglikelihood requests'): pass\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "not a git repository" not in result.stderr and "loglikelihood" not in result.stderr, result.stderr
    loud = subprocess.run(
        [sys.executable, "-c", check.replace("(False)", "(True)")], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(tmp_path)
    )
    assert "not a git repository" in loud.stderr and "loglikelihood" in loud.stderr  # --verbose shows them


def _env(tmp_path) -> dict:
    """The test process's environment without the quiet settings an earlier in-process command may have
    put there (each subprocess here chooses its own)."""
    import os

    from pipeline.environment import QUIET_ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path), "PCBMERGE_HOME": str(tmp_path / "home"), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}


def test_search_json_includes_the_final_test_scores():
    from flows.search import SearchOutcome

    outcome = SearchOutcome(
        finished=True, lambdas=[1.0], ratio=None, best_fitness=0.5, start_fitness=0.4, evaluations=4, rounds=1,
        build_seconds=0.1, eval_seconds=1.0, run_id="r", test_scores={"zoo_sort": 0.75},
    )  # fmt: skip
    assert outcome.summary()["test_scores"] == {"zoo_sort": 0.75}


def test_lineage_text_names_a_registered_input_once():
    from pipeline.report import lineage_lines

    lines = lineage_lines(NODE)
    assert not any("@earlier/2" in line for line in lines) and any("models:/earlier/2  sha256" in line for line in lines)
    assert any(f"org/expert@main  revision {'c' * 12}" in line for line in lines)


def test_the_tune_form_names_the_field():
    from flows.tune import tune_flow

    schema = _schema(tune_flow)
    assert "'ratoi' was unexpected" in str(_errors(schema, {"config": {**BASE, "parameters": {"ratoi": 1}, "evaluation": {"tasks": ["t"]}}}))
    assert "'pcbb' is not one of" in str(_errors(schema, {"config": {**BASE, "merge_method": "pcbb", "evaluation": {"tasks": ["t"]}}}))
    assert _errors(schema, {"config": {**BASE, "evaluation": {"tasks": ["t"]}}})["valid"]
