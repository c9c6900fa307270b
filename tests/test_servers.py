"""`pcbmerge up` / `down` with real servers on loopback, and a deployment triggered the way the UI does it.

The servers start once for the module (their startup is the cost: ~10-40 s each on two busy cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
from builders import serving

from infra.ports import check_port_free, free_port
from infra.processes import ServerProcess
from infra.server_state import Servers, read_state
from infra.servers import stop_servers
from pcbcore.errors import MergeInputError
from pcbmerge.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("servers")
    argv = ["up", "--workdir", str(workdir), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), "--json"]
    out = io.StringIO()
    started = time.monotonic()
    # The scheduler looks for due schedules every 5 s instead of 60 s, so the schedule test is quick.
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
        assert main(argv) == 0
    info = json.loads(out.getvalue())
    info["startup_seconds"] = time.monotonic() - started
    state = read_state(workdir)
    yield {"info": info, "state": state, "workdir": workdir}
    stop_servers(workdir)
    for record in (state.prefect, state.mlflow):
        assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_up_starts_both_servers_on_loopback(servers):
    info, state = servers["info"], servers["state"]
    print(f"both servers ready in {info['startup_seconds']:.1f} s")
    assert info["PREFECT_API_URL"] == f"{state.prefect.url}/api" and info["MLFLOW_TRACKING_URI"] == state.mlflow.url
    assert json.loads(_get(f"{info['PREFECT_API_URL']}/health")) is True
    assert _get(f"{info['MLFLOW_TRACKING_URI']}/health") == b"OK"
    for record in (state.prefect, state.mlflow):
        port = int(record.url.rsplit(":", 1)[1])
        family = [psutil.Process(record.pid), *psutil.Process(record.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in family for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, f"{record.name} listens on {listening}"
        assert record.create_time == psutil.Process(record.pid).create_time()
    assert (servers["workdir"] / "prefect" / "prefect.db").is_file() and (servers["workdir"] / "mlflow.db").is_file()


def test_up_refuses_taken_port_naming_it(servers, tmp_path):
    port = int(servers["state"].mlflow.url.rsplit(":", 1)[1])
    with pytest.raises(MergeInputError, match=rf"MLflow port {port} on 127.0.0.1 is taken by .*\(pid \d+\)"):
        check_port_free("127.0.0.1", port, "MLflow")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["up", "--workdir", str(tmp_path), "--prefect-port", str(free_port()), "--mlflow-port", str(port)]) == 2
    assert f"MLflow port {port}" in err.getvalue()
    assert not (tmp_path / "servers.json").exists()


def test_up_refuses_while_its_servers_run(servers):
    with pytest.raises(MergeInputError, match="still running"):
        from infra.servers import start_servers

        start_servers(servers["workdir"], prefect_port=free_port(), mlflow_port=free_port())


def test_down_never_stops_a_process_it_did_not_start(tmp_path):
    """A recorded pid whose start time differs (the OS recycled it) is left alone."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(stranger.pid).create_time()
        fake = ServerProcess("prefect", stranger.pid, created - 100.0, "http://127.0.0.1:1", "", "", [])
        state = Servers(str(tmp_path), "127.0.0.1", fake, ServerProcess("mlflow", 2**22 + 7, 0.0, "http://127.0.0.1:2", "", "", []))
        from dataclasses import asdict

        (tmp_path / "servers.json").write_text(
            json.dumps({"workdir": state.workdir, "host": state.host, "prefect": asdict(fake), "mlflow": asdict(state.mlflow)})
        )
        lines = stop_servers(tmp_path)
        assert all("no longer running" in line for line in lines)
        assert stranger.poll() is None, "down stopped a process it did not start"
    finally:
        stranger.kill()
        stranger.wait(10)


# ---------------------------------------------------------------- a served deployment, triggered like the UI

SECRET = "hf_servetestsecret0123456789"


def _api(method: str, url: str, body: dict | None = None, tries: int = 10):
    """One Prefect API call; a busy server (503 while SQLite is locked, 429) is asked again, as Prefect's
    own client and the UI do."""
    for attempt in range(tries):
        request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 502, 503) or attempt == tries - 1:
                raise
            time.sleep(1 + attempt)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"serve exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


@pytest.fixture
def served(servers, micro_zoo, tmp_path):
    """`pcbmerge serve --config` in its own process (started in another folder than the repository), pointed at
    the servers; stopped before the servers are."""
    task = micro_zoo.tasks[0]
    config = tmp_path / "served.yml"
    config.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(micro_zoo.base),
                "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks[:2]],
                "parameters": {"density": 0.5},
                "evaluation": {"tasks": [task], "include_path": str(micro_zoo.task_dir), "limit": 4},
                "register_as": "served",
            }
        )
    )
    with serving(config, servers["info"], tmp_path, HF_TOKEN=SECRET) as (proc, log):
        yield {"proc": proc, "log": log, "task": task}


def test_served_deployment_runs_from_the_api_and_logs_to_the_mlflow_server(servers, served):
    from mlflow import MlflowClient

    api, proc, log = servers["info"]["PREFECT_API_URL"], served["proc"], served["log"]
    started = time.monotonic()

    def merge_deployment():
        found = _api("POST", f"{api}/deployments/filter", {"deployments": {"name": {"any_": ["merge"]}}})
        return found[0] if found else None

    deployment = _wait(merge_deployment, 240, "the merge deployment", proc, log)
    print(f"deployment registered {time.monotonic() - started:.1f} s after serve started")
    # The UI's form: every field of the pipeline config is typed, with the YAML's values as defaults.
    schema = deployment["parameter_openapi_schema"]
    pipeline = schema["definitions"]["PipelineConfig"]["properties"]
    assert pipeline["register_as"]["description"] and pipeline["evaluation"]
    assert deployment["parameters"]["config"]["register_as"] == "served" and deployment["enforce_parameter_schema"]

    # What the UI's "Quick run" sends.
    flow_run = _api("POST", f"{api}/deployments/{deployment['id']}/create_flow_run", {"state": {"type": "SCHEDULED", "message": "Run from the UI"}})
    triggered = time.monotonic()
    terminal = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

    def finished():
        run = _api("GET", f"{api}/flow_runs/{flow_run['id']}")
        return run if run["state"]["type"] in terminal else None

    run = _wait(finished, 420, "the flow run to finish", proc, log)
    print(f"flow run finished in {time.monotonic() - triggered:.1f} s")
    assert run["state"]["type"] == "COMPLETED", log.read_text()[-3000:]

    mlflow_client = MlflowClient(tracking_uri=servers["info"]["MLFLOW_TRACKING_URI"], registry_uri=servers["info"]["MLFLOW_TRACKING_URI"])
    experiment = mlflow_client.get_experiment_by_name("pcbmerge")
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run['id']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert f"merged.{served['task']}" in runs[0].data.metrics
    version = mlflow_client.get_model_version("served", "1")
    assert version.run_id == runs[0].info.run_id
    # Artifacts went through the tracking server into its store, not to a path on the client's disk.
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((servers["workdir"] / "mlartifacts").rglob("lineage.json"))

    assert SECRET not in json.dumps({**runs[0].data.params, **runs[0].data.tags, "parameters": run["parameters"]})
    logs = _api("POST", f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    assert logs and SECRET not in "\n".join(entry["message"] for entry in logs)


def test_a_scheduled_deployment_gets_its_runs(servers, tmp_path):
    """The server's scheduler creates the runs of an interval schedule (SQLAlchemy 2.1 broke this silently)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.watch import watch_flow
    from pipeline.config import PipelineConfig
    from pipeline.watch_config import WatchConfig

    api = servers["info"]["PREFECT_API_URL"]
    watch = WatchConfig(source=str(tmp_path), pipeline=PipelineConfig(merge_method="linear", register_as="scheduled"))
    with temporary_settings(updates={PREFECT_API_URL: api}):
        deployment_id = watch_flow.to_deployment(name="scheduled", interval=3600, parameters={"config": watch.model_dump(mode="json")}).apply()

    def scheduled_runs():
        runs = _api("POST", f"{api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [str(deployment_id)]}}})
        return [r for r in runs if r["state"]["type"] == "SCHEDULED"]

    runs = _wait(scheduled_runs, 120, "the scheduler to create the schedule's runs")
    assert runs[0]["parameters"]["config"]["pipeline"]["register_as"] == "scheduled"
