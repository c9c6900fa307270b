"""MLflow runs: the client on the configured store, experiments, a flow's run, its params, metrics and
artifacts, and the search's per-round records.

One MLflow run per flow run. The MLflow *active run* is thread-local and Prefect tasks run in worker
threads, so nothing here uses the fluent `mlflow.start_run` state: the run id is passed around and every
call goes through an `MlflowClient` bound to the tracking URI from `pipeline.settings`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
from pathlib import Path
from typing import Any

from pcbcore.scratch import owner_alive, owner_tag
from pipeline import plots, tables
from pipeline.locks import exclusive
from pipeline.settings import load_settings

MAX_TAG_CHARS = 5000
# MLflow 3's UI opens an experiment by its kind: without one it guesses and may open the GenAI traces view;
# "custom_model_development" opens the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# host:pid-start of the process that opened a run (`pcbcore.scratch.owner_tag`)
OWNER_TAG = "pcbmerge.owner"
MAX_PARAM_CHARS = 6000


def client():
    """A client on the configured store. The registry resolves `models:/<logged model id>` sources
    through MLflow's process-wide tracking URI, so that is pointed at the same store."""
    import mlflow
    from mlflow import MlflowClient

    uri = load_settings().tracking_uri
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    if not uri.startswith("sqlite:") or uri in _READY_STORES:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # A new SQLite store is created and migrated by its first client (in MlflowClient's constructor and its
    # first registry call); two processes doing it at once collide ("duplicate column name"). One at a time,
    # then every later call in this process goes straight through.
    with exclusive(f"mlflow-store\n{uri}"):
        mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mlflow_client.search_registered_models(max_results=1)
    _READY_STORES.add(uri)
    return mlflow_client


# SQLite tracking stores this process has seen created (see `client`).
_READY_STORES: set[str] = set()


def experiment_id(name: str) -> str:
    """The experiment's id, created with an explicit artifact location under `$PCBMERGE_HOME/mlartifacts`.

    Against a tracking server (http/https) the server chooses: its `--artifacts-destination` (a folder or an
    object store), reached through the server, so workers on other machines and the UI read the same files."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if (found.tags or {}).get(EXPERIMENT_KIND_TAG) is None:  # made before the kind was set, or by another tool
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    uri = load_settings().tracking_uri
    location = None if uri.startswith(("http://", "https://")) else (load_settings().artifact_dir / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:  # created meanwhile by a concurrent flow
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise exc
        return found.experiment_id


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Open the flow's MLflow run; log the flattened config as params. Returns the run id."""
    from mlflow.entities import Param

    mlflow_client = client()
    tags = {**tags, OWNER_TAG: f"{socket.gethostname()}:{owner_tag()}"}  # lets a later run find this one dead
    run = mlflow_client.create_run(experiment_id(experiment), run_name=run_name, tags={k: v for k, v in tags.items() if v})
    flat = flatten(params)
    batch = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()]
    for start in range(0, len(batch), 100):
        mlflow_client.log_batch(run.info.run_id, params=batch[start : start + 100])
    return run.info.run_id


def finish_run(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status=status)


def reap_dead_runs(experiment: str) -> list[dict[str, Any]]:
    """Mark KILLED the RUNNING runs of `experiment` whose owner process (on this host) is gone: a process
    killed with SIGKILL cannot end its own run. The logged models such a run made that no registered version
    uses are discarded (`discard_logged_model`). Returns `{"run_id", "flow_run_id", "logged_models"}` of each,
    so the caller can mark the Prefect flow run that owned it as crashed too. Runs of live processes, of
    other hosts, or without an owner tag are left alone."""
    from mlflow.entities import RunTag, ViewType

    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = socket.gethostname()
    reaped = []
    for run in mlflow_client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ACTIVE_ONLY):
        owner = run.data.tags.get(OWNER_TAG, "")
        owner_host, _, process = owner.rpartition(":")
        pid, _, start = process.partition("-")
        if owner_host != host or not (pid.isdigit() and start.isdigit()) or owner_alive(int(pid), int(start)):
            continue
        # Its models first: once the run is KILLED no later run looks at it again.
        discarded = _discard_unregistered_models(mlflow_client, found.experiment_id, run.info.run_id)
        reason = f"its process ({owner}) ended without closing the run (killed); marked by a later run"
        mlflow_client.log_batch(run.info.run_id, tags=[RunTag("pcbmerge.killed", reason)])
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")
        reaped.append({"run_id": run.info.run_id, "flow_run_id": run.data.tags.get("prefect.flow_run_id", ""), "logged_models": discarded})
    return reaped


def _discard_unregistered_models(mlflow_client, experiment_id: str, run_id: str) -> list[str]:
    """A run killed while registering leaves its logged model PENDING (files half copied) or READY with no
    version (killed between the copy and the version): nothing will finish or read it. Discard those; a
    model a registered version uses is kept. Returns the discarded ids."""
    from mlflow.entities import LoggedModelStatus

    models = [m for m in _own_models(mlflow_client, experiment_id, f"source_run_id = '{run_id}'") if m.status != LoggedModelStatus.FAILED]
    if not models:
        return []
    used = {_version_model_id(v) for v in mlflow_client.search_model_versions(f"run_id = '{run_id}'")}
    discarded = []
    for model in models:
        if model.model_id not in used:
            discard_logged_model(mlflow_client, model, f"its run {run_id} was killed before registering it; discarded by a later run")
            discarded.append(model.model_id)
    return discarded


# Why a logged model was given up, on the model itself (it stays listed, FAILED, without files).
DISCARDED_TAG = "pcbmerge.discarded"


def discard_logged_model(mlflow_client, model, reason: str) -> None:
    """Mark a logged model FAILED, tagged with `reason`, and delete its files: a copy that no registered
    version uses, half written or whole, is a model's worth of disk that nothing will read."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.file_utils import local_file_uri_to_path

    mlflow_client.set_logged_model_tags(model.model_id, {DISCARDED_TAG: reason[:MAX_TAG_CHARS]})
    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    get_artifact_repository(model.artifact_location, tracking_uri=load_settings().tracking_uri).delete_artifacts()
    if model.artifact_location.startswith("file:"):  # a local store: its models/<id> folder, now empty, too
        with contextlib.suppress(OSError):
            Path(local_file_uri_to_path(model.artifact_location)).parent.rmdir()


def _own_models(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """The logged models pcbmerge made in the experiment that match `filter_string` (another tool's are left alone)."""
    models, token = [], None
    while True:
        page = mlflow_client.search_logged_models([experiment_id], filter_string=filter_string, page_token=token)
        models += [m for m in page if "pcbmerge.method" in (m.tags or {})]
        token = page.token
        if not token:
            return models


def _version_model_id(version) -> str:
    return getattr(version, "model_id", None) or version.source.removeprefix("models:/")


def log_results(run_id: str, config_yaml: str, scores: dict[str, dict[str, float]], tags: dict[str, str]) -> None:
    """Metrics `<model label>.<task>` (and `.mean`); artifacts: the config YAML, the result table (markdown
    and CSV) and a bar chart of per-task scores; tags."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = []
    for label, row in scores.items():
        metrics += [Metric(f"{label}.{t}", float(v), now, 0) for t, v in row.items()]
        if row:
            metrics.append(Metric(f"{label}.mean", sum(row.values()) / len(row), now, 0))
    mlflow_client = client()
    mlflow_client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "merge_config.yml").write_text(config_yaml)
        if scores:
            (folder / "results.md").write_text(tables.format_markdown(scores))
            (folder / "results.csv").write_text(tables.format_csv(scores))
            plots.bar_chart(scores, folder / "scores.png", title=tags.get("pcbmerge.method", ""))
        for path in sorted(folder.iterdir()):
            mlflow_client.log_artifact(run_id, str(path))


def log_lineage_views(run_id: str, node: dict[str, Any]) -> None:
    """The lineage as a picture (`lineage.png`, shown by the MLflow UI's artifact view) and as a mermaid graph
    (`lineage.md`); `lineage.json` is the full node."""
    from pipeline import report

    mlflow_client = client()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report.lineage_png(node, folder / "lineage.png")
        (folder / "lineage.md").write_text("# Lineage\n\n" + report.lineage_mermaid(node))
        for name in ("lineage.png", "lineage.md"):
            mlflow_client.log_artifact(run_id, str(folder / name))


def log_json(mlflow_client, run_id: str, data: dict[str, Any], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        mlflow_client.log_artifact(run_id, str(path))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [x, y]}` -> `{"a.b": 1, "c.0": x, "c.1": y}` (MLflow params are flat)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for k, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data} if prefix else {"value": data}


# ---------------------------------------------------------------- the coefficient search


def reopen_run(run_id: str) -> None:
    """A resumed search goes on logging into the run it started, now owned by this process."""
    mlflow_client = client()
    mlflow_client.update_run(run_id, status="RUNNING")
    mlflow_client.set_tag(run_id, OWNER_TAG, f"{socket.gethostname()}:{owner_tag()}")


def log_search_round(run_id: str, record: dict[str, Any], state_blob: bytes, history: dict[str, Any], artifact_path: str) -> None:
    """One finished round: a nested run per candidate (λ, per-task validation scores, fitness); metrics
    `best_fitness`, `mean_fitness`, `build_seconds`, `eval_seconds` on the parent at step = round; the
    pickled CMA-ES state and every evaluation so far as artifacts under `artifact_path`."""
    import time

    from mlflow.entities import Metric, Param

    mlflow_client = client()
    now, step = int(time.time() * 1000), int(record["round"])
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    for candidate in record["candidates"]:
        ratio = candidate.get("ratio")
        name = f"round {step} candidate {candidate['index']}" + ("" if ratio is None else f" (ratio {ratio})")
        child = mlflow_client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": run_id, "pcbmerge.search.round": str(step)})
        params = [Param(f"lambda.{i}", repr(float(x))) for i, x in enumerate(candidate["lambdas"])]
        params += [Param("round", str(step)), Param("index", str(candidate["index"])), Param("split", candidate["split"]), Param("ratio", str(ratio))]
        metrics = [Metric(f"{candidate['split']}.{task}", float(v), now, 0) for task, v in candidate["scores"].items()]
        metrics += [Metric(k, float(candidate[k]), now, 0) for k in ("fitness", "build_seconds", "eval_seconds")]
        mlflow_client.log_batch(child.info.run_id, metrics=metrics, params=params)
        mlflow_client.set_terminated(child.info.run_id, "FINISHED")
    keys = ("best_fitness", "mean_fitness", "build_seconds", "eval_seconds")
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(record[k]), now, step) for k in keys])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cma_state.pkl").write_bytes(state_blob)
        (Path(tmp) / "evaluations.json").write_text(json.dumps(history, indent=2) + "\n")
        for name in ("cma_state.pkl", "evaluations.json"):
            mlflow_client.log_artifact(run_id, str(Path(tmp) / name), artifact_path=artifact_path)


def log_search_summary(run_id: str, plot_png: bytes, final: dict[str, Any], tags: dict[str, str]) -> None:
    """The search's end: the convergence plot, the final λ (and why each ratio stopped), summary tags."""
    from mlflow.entities import RunTag

    mlflow_client = client()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "convergence.png").write_bytes(plot_png)
        (Path(tmp) / "final_lambdas.json").write_text(json.dumps(final, indent=2) + "\n")
        for name in ("convergence.png", "final_lambdas.json"):
            mlflow_client.log_artifact(run_id, str(Path(tmp) / name), artifact_path="search")
    mlflow_client.log_batch(run_id, tags=[RunTag(k, v[:MAX_TAG_CHARS]) for k, v in tags.items()])
