"""Every MLflow call of the project: runs, params, metrics, artifacts, the Model Registry and lineage.

One MLflow run per flow run. The MLflow *active run* is thread-local and Prefect tasks run in worker
threads, so nothing here uses the fluent `mlflow.start_run` state: the run id is passed around and every
call goes through an `MlflowClient` bound to the tracking URI from `pcbmerge.settings`.

A registered model version carries its lineage three ways: `lineage.json` in its run's artifacts (the full
node), compact tags (`pcbmerge.*`, searchable in the UI) and a readable description.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pcbcore.errors import MergeInputError
from pcbmerge.settings import load_settings

log = logging.getLogger(__name__)

# Artifact downloads draw tqdm bars on stderr; they only add noise to our CLI output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

LINEAGE_ARTIFACT = "lineage.json"
MAX_TAG_CHARS = 5000
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
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_transient_tracking_error(exc: BaseException) -> bool:
    """A tracking server that is restarting or a SQLite store locked by another writer: worth a retry."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"} or "database is locked" in str(exc)
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with mlflow
        return False
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def _retry_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient_tracking_error(exc)


_TRACKING = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)


# ---------------------------------------------------------------- runs


def experiment_id(name: str) -> str:
    """The experiment's id, created with an explicit artifact location under `$PCBMERGE_HOME/mlartifacts`.

    Against a tracking server (http/https) the server chooses: its `--artifacts-destination` (a folder or an
    object store), reached through the server, so workers on other machines and the UI read the same files."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = load_settings().tracking_uri
    location = None if uri.startswith(("http://", "https://")) else (load_settings().artifact_dir / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created meanwhile by a concurrent flow
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise exc
        return found.experiment_id


@task(name="track-start", **_TRACKING)
def start_tracking(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Open the flow's MLflow run; log the flattened config as params. Returns the run id."""
    from mlflow.entities import Param

    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment), run_name=run_name, tags={k: v for k, v in tags.items() if v})
    flat = flatten(params)
    batch = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()]
    for start in range(0, len(batch), 100):
        mlflow_client.log_batch(run.info.run_id, params=batch[start : start + 100])
    return run.info.run_id


@task(name="track-finish", **_TRACKING)
def finish_tracking(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status=status)


@task(name="track-results", **_TRACKING)
def track_results(run_id: str, config_yaml: str, scores: dict[str, dict[str, float]], tags: dict[str, str]) -> None:
    """Metrics `<model label>.<task>` (and `.mean`); artifacts: the config YAML, the result table (markdown
    and CSV) and a bar chart of per-task scores; tags."""
    import time

    from mlflow.entities import Metric, RunTag

    from pcbmerge import report

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
            (folder / "results.md").write_text(report.format_markdown(scores))
            (folder / "results.csv").write_text(report.format_csv(scores))
            report.bar_chart(scores, folder / "scores.png", title=tags.get("pcbmerge.method", ""))
        for path in sorted(folder.iterdir()):
            mlflow_client.log_artifact(run_id, str(path))


# ---------------------------------------------------------------- registry


@task(name="track-register", **_TRACKING)
def register_model(run_id: str, experiment: str, folder: str, name: str, lineage: dict[str, Any]) -> dict[str, str]:
    """Log the merged folder as an MLflow LoggedModel and register it under `name`; attach the lineage.

    Returns `{"name", "version", "uri"}`. If anything fails after the version exists, the version is
    deleted: a failed flow leaves no registry version behind.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    logged = mlflow_client.create_logged_model(experiment_id(experiment), name=name, source_run_id=run_id, tags={"pcbmerge.method": str(lineage.get("method"))})
    mlflow_client.log_model_artifacts(logged.model_id, folder)
    mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    try:
        mlflow_client.create_registered_model(name, description="Merged by pcbmerge; each version's lineage is in its tags and lineage.json.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id)
    try:
        node = {**lineage, "model": f"models:/{name}/{version.version}"}
        _log_json(mlflow_client, run_id, node, LINEAGE_ARTIFACT)
        for key, value in lineage_tags(node).items():
            mlflow_client.set_model_version_tag(name, version.version, key, value)
        mlflow_client.update_model_version(name, version.version, description=lineage_description(node))
    except BaseException:
        mlflow_client.delete_model_version(name, version.version)
        raise
    return {"name": name, "version": str(version.version), "uri": f"models:/{name}/{version.version}"}


@task(name="track-lineage", **_TRACKING)
def log_lineage(run_id: str, lineage: dict[str, Any]) -> None:
    """`lineage.json` for a merge that is not registered (its `model` is the output folder)."""
    _log_json(client(), run_id, lineage, LINEAGE_ARTIFACT)


def _log_json(mlflow_client, run_id: str, data: dict[str, Any], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        mlflow_client.log_artifact(run_id, str(path))


def lineage_tags(node: dict[str, Any]) -> dict[str, str]:
    tags = {
        "pcbmerge.method": str(node.get("method")),
        "pcbmerge.parameters": json.dumps(node.get("parameters"), sort_keys=True),
        "pcbmerge.lambdas": json.dumps(node.get("lambdas")),
        "pcbmerge.run_id": str(node.get("run_id")),
        "pcbmerge.fingerprint": str(node.get("fingerprint")),
        "prefect.flow_run_id": str(node.get("flow_run_id")),
    }
    for k, item in enumerate(node.get("inputs", [])):
        prefix = f"pcbmerge.input.{k}"
        tags[f"{prefix}.role"] = item["role"]
        tags[f"{prefix}.ref"] = item["ref"]
        tags[f"{prefix}.revision"] = str(item.get("revision"))
        tags[f"{prefix}.fingerprint"] = item["fingerprint"]
        if item.get("registered"):
            tags[f"{prefix}.registered"] = f"models:/{item['registered']['name']}/{item['registered']['version']}"
    return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}


def lineage_description(node: dict[str, Any]) -> str:
    lines = [f"Merged with `{node.get('method')}` {json.dumps(node.get('parameters'), sort_keys=True)}, λ = {node.get('lambdas')}.", ""]
    for item in node.get("inputs", []):
        lines.append(f"- {item['role']}: `{item['ref']}` (revision {item.get('revision')}, sha256 {item['fingerprint'][:16]}…)")
    lines += ["", f"MLflow run {node.get('run_id')}, Prefect flow run {node.get('flow_run_id')}."]
    return "\n".join(lines)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` -> (name, version, None); `models:/NAME@alias` -> (name, None, alias)."""
    body = uri.removeprefix("models:/")
    if "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, None, alias
    elif body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, version, None
    raise MergeInputError(f"model reference '{uri}' must look like models:/NAME/VERSION or models:/NAME@alias")


def model_version(uri: str):
    """The registry entry `uri` names, or `MergeInputError` naming it."""
    name, version, alias = parse_model_uri(uri)
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        return mlflow_client.get_model_version_by_alias(name, alias) if alias else mlflow_client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            raise MergeInputError(f"model reference '{uri}' names no registered model version in {load_settings().tracking_uri}") from None
        raise


def download_registered_model(uri: str, dest_root: Path) -> tuple[str, str, Path]:
    """Download a registered version's files once into `dest_root/NAME/VERSION`; returns (name, version, folder).

    The download is reused only while that version still names the same logged model: a registered model
    deleted and made again, or another tracking store, numbers its versions from 1 again."""
    from mlflow.artifacts import download_artifacts

    version = model_version(uri)
    name, number = version.name, str(version.version)
    model_id = getattr(version, "model_id", None) or version.source.removeprefix("models:/")
    target = dest_root / name / number
    if (target / ".complete").is_file() and (target / ".complete").read_text().strip() == model_id:
        return name, number, target
    location = client().get_logged_model(model_id).artifact_location
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{number}.", dir=target.parent))
    try:
        local = Path(download_artifacts(artifact_uri=location, dst_path=str(tmp)))  # tmp/<last part of location>
        (local / ".complete").write_text(model_id + "\n")
        if target.exists():
            shutil.rmtree(target)
        local.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name, number, target


def read_lineage(uri: str) -> dict[str, Any]:
    """The lineage node stored with a registered model version (`lineage.json` of its run)."""
    version = model_version(uri)
    if not version.run_id:
        raise MergeInputError(f"model reference '{uri}' has no MLflow run, so no pcbmerge lineage")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client().download_artifacts(version.run_id, LINEAGE_ARTIFACT, tmp)
        except OSError:
            raise MergeInputError(f"model reference '{uri}' was not registered by pcbmerge (its run has no {LINEAGE_ARTIFACT})") from None
        node = json.loads(Path(path).read_text())
    return {**node, "model": f"models:/{version.name}/{version.version}"}


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


# ---------------------------------------------------------------- lineage nodes


def lineage_node(config, inputs: dict, merged, run_id: str, flow_run_id: str | None) -> dict[str, Any]:
    """The lineage of one merge: `{"model", "method", "parameters", "lambdas", "run_id", "inputs": [...]}`.

    `inputs[k].lineage` is left null here; `pcbmerge lineage` fills it in for inputs that are registered
    models by reading their own node, recursively.
    """
    merge = config.merge_config()
    entries = [("base", merge.base_model, None)] + [("model", ref, params.model_dump(by_alias=True)) for ref, params in zip(merge.models, merge.model_params)]
    return {
        "model": merged.folder,
        "method": merge.method_name,
        "parameters": merge.params.model_dump(by_alias=True),
        "lambdas": merged.lambdas,
        "fingerprint": merged.fingerprint,
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        "inputs": [
            {
                "role": role,
                "ref": ref,
                "revision": inputs[ref].revision,
                "fingerprint": inputs[ref].fingerprint,
                "registered": inputs[ref].registered.model_dump() if inputs[ref].registered else None,
                "parameters": params,
                "lineage": None,
            }
            for role, ref, params in entries
        ],
    }


# ---------------------------------------------------------------- coefficient search (issue 5; `flows/search.py`)


@task(name="track-reopen", **_TRACKING)
def reopen_tracking(run_id: str) -> None:
    """A resumed search goes on logging into the run it started."""
    client().update_run(run_id, status="RUNNING")


@task(name="track-search-round", **_TRACKING)
def track_search_round(run_id: str, record: dict[str, Any], state_blob: bytes, history: dict[str, Any], artifact_path: str) -> None:
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


@task(name="track-search-summary", **_TRACKING)
def track_search_summary(run_id: str, plot_png: bytes, final: dict[str, Any], tags: dict[str, str]) -> None:
    """The search's end: the convergence plot, the final λ (and why each ratio stopped), summary tags."""
    from mlflow.entities import RunTag

    mlflow_client = client()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "convergence.png").write_bytes(plot_png)
        (Path(tmp) / "final_lambdas.json").write_text(json.dumps(final, indent=2) + "\n")
        for name in ("convergence.png", "final_lambdas.json"):
            mlflow_client.log_artifact(run_id, str(Path(tmp) / name), artifact_path="search")
    mlflow_client.log_batch(run_id, tags=[RunTag(k, v[:MAX_TAG_CHARS]) for k, v in tags.items()])


@task(name="track-search-version-tags", **_TRACKING)
def tag_model_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Extra tags on a registered version (a searched merge: its search settings and evaluation count)."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value[:MAX_TAG_CHARS])


# ---------------------------------------------------------------- watching (flows/watch.py)


def registered_versions(name: str) -> list[str]:
    """Every version number of registered model `name`, oldest first (none when it does not exist)."""
    versions = client().search_model_versions(f"name = '{name}'")
    return [str(v) for v in sorted(int(version.version) for version in versions)]


def last_merge_lineage(name: str) -> dict[str, Any] | None:
    """The lineage of the newest version of `name` (what the last merge registered there used), or None."""
    versions = registered_versions(name)
    return read_lineage(f"models:/{name}/{versions[-1]}") if versions else None
