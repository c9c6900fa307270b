"""fetch_checkpoint's resolution (local folder, Hub cache, errors) and fingerprints, without the Prefect engine
(`.fn` is the task's own function); its cache key with the real engine (test harness): a changed input is
fetched again, an unchanged one is not."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pcbcore.errors import MergeInputError
from pipeline.fingerprints import fingerprint_folder
from pipeline.references import FetchedCheckpoint
from pipeline.registry import parse_model_uri
from pipeline.retry import TransientFetchError, is_transient
from tasks.fetch import fetch_checkpoint


def _fetch_with_engine(refs: list[str], cache_dir: Path) -> list[tuple[str, FetchedCheckpoint]]:
    """Fetch each ref in turn in one flow run, as the pipeline does: (state name, result) per ref."""
    from prefect import flow

    @flow
    def fetch_each():
        states = [fetch_checkpoint(ref, str(cache_dir), return_state=True) for ref in refs]
        return [(state.name, state.result()) for state in states]

    return fetch_each()


def _add_hub_snapshot(folder: Path, repo: str, commit: str) -> None:
    """Put `folder` into the local Hub cache as `repo` at `commit`, and point its `main` there."""
    hub = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, hub / "snapshots" / commit, dirs_exist_ok=True)
    (hub / "refs").mkdir(parents=True, exist_ok=True)
    (hub / "refs" / "main").write_text(commit)


def test_local_folder_fingerprint_is_reused_and_tracks_changes(tiny_zoo, tmp_path):
    base, _ = tiny_zoo
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    first = fetch_checkpoint.fn(str(folder), str(tmp_path / "cache"))
    assert first.folder == str(folder) and first.source == "local" and len(first.fingerprint) == 64
    assert "model.safetensors" in first.files and "config.json" in first.files
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == len(first.files)

    # Same bytes elsewhere: same fingerprint (content, not path).
    assert fingerprint_folder(base, tmp_path / "other") == first.fingerprint

    # A stored digest is reused while size and mtime match (so it is cheap), and dropped when they change.
    weights = folder / "model.safetensors"
    record = next(p for p in (tmp_path / "cache" / "digests").iterdir() if str(weights) in p.read_text())
    record.write_text(record.read_text().replace(first.files["model.safetensors"], "0" * 64))
    assert fetch_checkpoint.fn(str(folder), str(tmp_path / "cache")).files["model.safetensors"] == "0" * 64
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = fetch_checkpoint.fn(str(folder), str(tmp_path / "cache"))
    assert changed.files["model.safetensors"] not in ("0" * 64, first.files["model.safetensors"])


def test_hub_id_resolves_from_the_local_hub_cache(tiny_zoo, tmp_path):
    base, _ = tiny_zoo
    commit = "0123456789abcdef0123456789abcdef01234567"
    _add_hub_snapshot(base, "pcbtest/tiny", commit)
    for ref in ("pcbtest/tiny", "pcbtest/tiny@main", f"pcbtest/tiny@{commit}"):
        fetched = fetch_checkpoint.fn(ref, str(tmp_path))
        assert fetched.source == "hub" and fetched.revision == commit
        assert fetched.fingerprint == fingerprint_folder(base, tmp_path / "d")


def test_one_folder_named_two_ways_is_fetched_as_each_name(prefect_harness, tiny_zoo, tmp_path, monkeypatch):
    """The flows look their inputs up by the ref as written: a cached fetch made under another name for the
    same folder would leave that lookup without its key (a KeyError in validate_checkpoints)."""
    base, _ = tiny_zoo
    shutil.copytree(base, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    refs = [str(tmp_path / "model"), "model", "./model/", str(tmp_path / "model")]
    fetched = _fetch_with_engine(refs, tmp_path / "cache")
    assert [checkpoint.ref for _, checkpoint in fetched] == refs
    assert len({checkpoint.fingerprint for _, checkpoint in fetched}) == 1
    assert [state for state, _ in fetched] == ["Completed", "Completed", "Completed", "Cached"]


def test_a_changed_input_is_never_served_from_the_cache(prefect_harness, tiny_zoo, tmp_path):
    """Files rewritten under their old size and mtime (a copy that keeps time stamps), and a Hub branch that
    moved, are fetched again; the same input fetched again is a cache hit."""
    base, experts = tiny_zoo
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    _add_hub_snapshot(base, "pcbtest/moving", "1" * 40)
    before = _fetch_with_engine([str(folder), "pcbtest/moving"], tmp_path / "cache")

    weights = folder / "model.safetensors"
    stat = weights.stat()
    replacement = (Path(experts[0]) / "model.safetensors").read_bytes()
    assert len(replacement) == stat.st_size and replacement != weights.read_bytes()
    weights.write_bytes(replacement)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _add_hub_snapshot(Path(experts[0]), "pcbtest/moving", "2" * 40)
    after = _fetch_with_engine([str(folder), "pcbtest/moving", str(folder)], tmp_path / "cache")

    assert before[0][1].fingerprint == before[1][1].fingerprint == fingerprint_folder(base, tmp_path / "fresh")
    assert [state for state, _ in after] == ["Completed", "Completed", "Cached"]
    assert after[0][1].fingerprint == after[2][1].fingerprint == fingerprint_folder(folder, tmp_path / "fresh2") != before[0][1].fingerprint
    assert after[1][1].fingerprint == fingerprint_folder(experts[0], tmp_path / "fresh") and after[1][1].revision == "2" * 40


def test_a_moved_alias_or_a_registered_name_made_again_is_downloaded_again(tiny_zoo, tmp_path):
    """models:/NAME@alias follows the alias; models:/NAME/1 of a registered model deleted and registered
    again is another model (versions number from 1 again), so its earlier download is not reused."""
    from pipeline.tracking import client
    from tasks.track import register_model, start_tracking

    base, experts = tiny_zoo
    name, cache = "pcbtest-reborn", str(tmp_path / "cache")

    def register(folder: Path) -> str:
        run_id = start_tracking.fn("pcbtest-fetch", name, {}, {})
        return register_model.fn(run_id, "pcbtest-fetch", str(folder), name, {"method": "test"})["version"]

    def fingerprint(folder: Path) -> str:
        return fingerprint_folder(folder, tmp_path / "fresh")

    client().set_registered_model_alias(name, "champion", register(base))
    assert fetch_checkpoint.fn(f"models:/{name}@champion", cache).fingerprint == fingerprint(base)
    client().set_registered_model_alias(name, "champion", register(experts[0]))
    assert fetch_checkpoint.fn(f"models:/{name}@champion", cache).fingerprint == fingerprint(experts[0])

    client().delete_registered_model(name)
    assert register(experts[1]) == "1"
    fetched = fetch_checkpoint.fn(f"models:/{name}/1", cache)
    assert fetched.fingerprint == fingerprint(experts[1]) and fetched.registered.version == "1"


@pytest.mark.parametrize(
    "ref, words",
    [
        ("pcbtest/not-downloaded", "not-downloaded"),
        ("./no/such/folder", "no/such/folder"),
        ("models:/bad-uri", "models:/bad-uri"),
    ],
)
def test_a_reference_to_nothing_fails_at_once_naming_it(ref, words, tmp_path):
    with pytest.raises(MergeInputError, match=words) as info:
        fetch_checkpoint.fn(ref, str(tmp_path))
    assert not is_transient(info.value)  # so Prefect does not retry it


def test_only_transient_errors_are_retried():
    assert is_transient(TransientFetchError("x")) and is_transient(ConnectionError()) and is_transient(TimeoutError())
    assert not is_transient(MergeInputError("bad")) and not is_transient(ValueError("bad"))


def test_model_uris():
    assert parse_model_uri("models:/a/3") == ("a", "3", None)
    assert parse_model_uri("models:/a@champion") == ("a", None, "champion")
    for bad in ("models:/a", "models:/a/b/c", "models:/a/x"):
        with pytest.raises(MergeInputError, match=bad):
            parse_model_uri(bad)
