"""The MLflow Model Registry: registering a merged folder with its lineage, reading versions back,
`models:/` references and their downloads.

A registered model version carries its lineage three ways: `lineage.json` in its run's artifacts (the full
node), compact tags (`pcbmerge.*`, searchable in the UI) and a readable description.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pcbcore.errors import MergeInputError
from pcbcore.scratch import owned_folder, remove_leftovers
from pipeline.lineage import LINEAGE_ARTIFACT, lineage_description, lineage_tags
from pipeline.locks import exclusive
from pipeline.settings import load_settings
from pipeline.tracking import MAX_TAG_CHARS, client, discard_logged_model, experiment_id, log_json

log = logging.getLogger(__name__)

# A full disk, a quota, or a file-size limit: one sentence for the user, not a traceback.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def version_with_content(name: str, fingerprint: str) -> str | None:
    """The number of the oldest version of `name` whose weights have this content fingerprint, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    same = sorted(int(v.version) for v in versions if (v.tags or {}).get("pcbmerge.fingerprint") == fingerprint)
    return str(same[0]) if same else None


def register_model(run_id: str, experiment: str, folder: str, name: str, lineage: dict[str, Any]) -> dict[str, str]:
    """Register the merged folder under `name`, keyed by content: when a version of `name` already holds
    the same bytes (its `pcbmerge.fingerprint` tag equals the merge's fingerprint), that version is the
    answer — no new version, no second copy of the weights — and this run is tagged with the version it
    matched. Otherwise the folder is logged as an MLflow LoggedModel and registered as a new version
    carrying the lineage.

    Returns `{"name", "version", "uri", "matched"}` (`matched`: "true" when an existing version was
    reused). If anything fails after a new version exists, the version is deleted: a failed flow leaves
    no registry version behind. If the copy of the folder fails, the logged model is discarded (FAILED,
    its partial files deleted); a full disk there is one sentence (`MergeInputError`).
    """
    # Two identical runs at once must make one version: the look-up and the creation happen under one lock.
    with exclusive(f"registry\n{load_settings().tracking_uri}\n{name}"):
        return _register(run_id, experiment, folder, name, lineage)


def _register(run_id: str, experiment: str, folder: str, name: str, lineage: dict[str, Any]) -> dict[str, str]:
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    fingerprint = lineage.get("fingerprint")
    matched = version_with_content(name, fingerprint) if fingerprint else None
    if matched is not None:
        uri = f"models:/{name}/{matched}"
        if not mlflow_client.get_model_version(name, matched).description:  # its run was killed before finishing it
            mlflow_client.update_model_version(name, matched, description=lineage_description({**lineage, "model": uri}))
        log_json(mlflow_client, run_id, {**lineage, "model": uri}, LINEAGE_ARTIFACT)
        mlflow_client.set_tag(run_id, "pcbmerge.registered_version", uri)
        mlflow_client.set_tag(run_id, "pcbmerge.registered_version_matched", "true")
        return {"name": name, "version": matched, "uri": uri, "matched": "true"}
    logged = mlflow_client.create_logged_model(experiment_id(experiment), name=name, source_run_id=run_id, tags={"pcbmerge.method": str(lineage.get("method"))})
    try:
        mlflow_client.log_model_artifacts(logged.model_id, folder)
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        try:
            mlflow_client.create_registered_model(name, description="Merged by pcbmerge; each version's lineage is in its tags and lineage.json.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    except BaseException as exc:  # no version names the model yet: its files can go
        _give_up(mlflow_client, logged, f"registering {folder} failed before a version named it ({type(exc).__name__}: {exc})")
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise MergeInputError(
                f"cannot register '{folder}' as '{name}': {os.strerror(exc.errno).lower()} while copying it into the MLflow artifact store "
                f"{logged.artifact_location} (nothing was left behind: no version, no partial copy); free space there and run the same command again"
            ) from None
        raise
    # The lineage tags (the content fingerprint among them) go on with the version itself, so a version is
    # never without its fingerprint: a run killed right after this line is matched by its re-run.
    tags = lineage_tags(lineage)
    version = mlflow_client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id, tags=tags)
    try:
        node = {**lineage, "model": f"models:/{name}/{version.version}"}
        log_json(mlflow_client, run_id, node, LINEAGE_ARTIFACT)
        for key, value in lineage_tags(node).items():
            mlflow_client.set_model_version_tag(name, version.version, key, value)
        mlflow_client.update_model_version(name, version.version, description=lineage_description(node))
        mlflow_client.set_tag(run_id, "pcbmerge.registered_version", node["model"])
    except BaseException as exc:
        mlflow_client.delete_model_version(name, version.version)
        _give_up(mlflow_client, logged, f"its version {version.version} was deleted: registering it failed ({type(exc).__name__}: {exc})")
        raise
    return {"name": name, "version": str(version.version), "uri": f"models:/{name}/{version.version}", "matched": "false"}


def _give_up(mlflow_client, logged, reason: str) -> None:
    """Discard a logged model whose registration failed (FAILED, files deleted). Where the store does not
    answer just now, the error being raised is the one to report: the model is left as it is (a run left
    RUNNING by that outage has it discarded when a later run reaps the run)."""
    from mlflow.exceptions import MlflowException

    try:
        discard_logged_model(mlflow_client, logged, reason)
    except (MlflowException, OSError) as exc:
        log.warning("could not discard logged model %s of a failed registration: %s", logged.model_id, exc)


def describe_registration(registered: dict[str, str]) -> str:
    """One log line: the new version, or the existing version whose content the merge matched."""
    if registered.get("matched") == "true":
        return f"same weights as {registered['uri']} (content fingerprint); no new version registered"
    return f"registered {registered['uri']}"


def tag_model_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Extra tags on a registered version (a searched merge: its search settings and evaluation count)."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value[:MAX_TAG_CHARS])


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
    remove_leftovers(target.parent, number)  # a download that was killed part-way
    tmp = owned_folder(target.parent, number)
    try:
        local = Path(download_artifacts(artifact_uri=location, dst_path=str(tmp)))  # tmp/<last part of location>
        (local / ".complete").write_text(model_id + "\n")
        if target.exists():
            shutil.rmtree(target)
        local.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name, number, target


def registered_versions(name: str) -> list[str]:
    """Every version number of registered model `name`, oldest first (none when it does not exist)."""
    versions = client().search_model_versions(f"name = '{name}'")
    return [str(v) for v in sorted(int(version.version) for version in versions)]


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


def last_merge_lineage(name: str) -> dict[str, Any] | None:
    """The lineage of the newest version of `name` (what the last merge registered there used), or None."""
    versions = registered_versions(name)
    return read_lineage(f"models:/{name}/{versions[-1]}") if versions else None
