"""Deployment declarations: `pcbmerge serve`'s (infra/deploy.py) and the work-pool file (infra/prefect.yaml).
Built locally, no server: names, schedules, one-at-a-time watch, and a form field with a description for
every parameter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_pipeline_config
from pipeline.watch_config import WatchConfig

ROOT = Path(__file__).resolve().parents[1]


def _fields_without_description(schema: dict) -> list[str]:
    missing = []
    for model, definition in [("root", schema), *schema.get("definitions", schema.get("$defs", {})).items()]:
        for field, spec in definition.get("properties", {}).items():
            if model == "root":
                continue  # the flow's own arguments: `config` is the model below, resume/stop_after_rounds are plain
            if "description" not in spec:
                missing.append(f"{model}.{field}")
    return missing


@pytest.fixture
def pipeline(tmp_path):
    return parse_pipeline_config({"merge_method": "ties", "base_model": str(tmp_path), "models": [{"model": "a"}, {"model": "b"}], "register_as": "team"})


def test_serve_declares_the_deployments_with_forms(pipeline, tmp_path):
    from infra.deploy import build_deployments

    watch = WatchConfig(source=str(tmp_path), pipeline=pipeline)
    deployments = {d.name: d for d in build_deployments(pipeline, watch, interval=3600)}
    expected = {("merge", "merge-flow"), ("search", "search-flow"), ("tune", "tune-flow"), ("watch", "watch-flow")}
    assert {(n, d.flow_name) for n, d in deployments.items()} == expected
    assert deployments["merge"].parameters["config"]["register_as"] == "team"
    assert deployments["watch"].parameters["config"]["source"] == str(tmp_path)
    [schedule] = deployments["watch"].schedules
    assert schedule.schedule.interval.total_seconds() == 3600
    assert deployments["watch"].concurrency_limit == 1
    for deployment in deployments.values():
        assert deployment.enforce_parameter_schema
        schema = deployment._parameter_openapi_schema.model_dump()
        assert _fields_without_description(schema) == [], deployment.name


def test_serve_cron_schedule(pipeline, tmp_path):
    from infra.deploy import build_deployments

    deployments = {d.name: d for d in build_deployments(None, WatchConfig(source=str(tmp_path), pipeline=pipeline), cron="0 * * * *")}
    assert deployments["merge"].parameters == {}
    assert deployments["watch"].schedules[0].schedule.cron == "0 * * * *"


def test_prefect_yaml_names_the_flows_and_valid_parameters():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"merge", "search", "tune", "watch"}
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == f"{deployment['name']}-flow"
        assert deployment["work_pool"]["name"] == "pcbmerge"
    watch = next(d for d in spec["deployments"] if d["name"] == "watch")
    config = WatchConfig.model_validate(watch["parameters"]["config"])
    assert config.pipeline.register_as and watch["concurrency_limit"] == 1


def test_serve_refuses_incomplete_options(capsys, tmp_path):
    from pcbmerge.cli import main

    assert main(["serve", "--watch-source", str(tmp_path)]) == 2
    assert "--watch-source needs --config" in capsys.readouterr().err
    assert main(["serve", "--every", "1h"]) == 2
    assert "give --watch-source too" in capsys.readouterr().err


def test_task_runner_is_chosen_by_settings(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from infra.task_runners import task_runner
    from pipeline.search_config import SearchSettings

    monkeypatch.delenv("PCBMERGE_DASK_ADDRESS", raising=False)
    assert isinstance(task_runner(), ThreadPoolTaskRunner)  # a deployment's runner, from the settings alone
    assert isinstance(task_runner(SearchSettings()), ThreadPoolTaskRunner)
    monkeypatch.setenv("PCBMERGE_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    runner = task_runner()
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    assert task_runner(SearchSettings()).address == "tcp://127.0.0.1:8786"
    assert task_runner(SearchSettings(dask_address="tcp://10.0.0.1:8786")).address == "tcp://10.0.0.1:8786"  # the config wins


PIPELINE_PARAMETERS = {"merge_method": "linear", "base_model": "/tmp", "models": [{"model": "a"}], "register_as": "x"}


@pytest.mark.parametrize(
    "module, name, parameters",
    [
        ("flows.watch", "watch_flow", {"config": {"source": "/tmp", "pipeline": {"merge_method": "linear", "register_as": "x"}}}),
        ("flows.merge", "merge_flow", {"config": PIPELINE_PARAMETERS}),
        ("flows.search", "search_flow", {"config": {**PIPELINE_PARAMETERS, "evaluation": {"tasks": ["t"]}}, "resume": True}),
    ],
)
def test_served_flow_survives_pickling_by_value(module, name, parameters, tmp_path):
    """`pcbmerge serve` and `pcbmerge watch --every` serve flow objects; Prefect pickles each by value into a
    fresh process, where pydantic must still know the parameter model (postponed annotations would leave
    only its name)."""
    import importlib
    import json
    import subprocess
    import sys

    import cloudpickle

    flow = getattr(importlib.import_module(module), name)
    (tmp_path / "flow.pkl").write_bytes(cloudpickle.dumps(flow))
    check = "import cloudpickle, json, sys; flow = cloudpickle.loads(open(sys.argv[1], 'rb').read()); flow.validate_parameters(json.loads(sys.argv[2]))"
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path / "flow.pkl"), json.dumps(parameters)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
