"""fetch_checkpoint's resolution (local folder, Hub cache, errors) and fingerprints, without the Prefect engine
(`.fn` is the task's own function)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pcbcore.errors import MergeInputError
from tasks.fetch import fetch_checkpoint, fingerprint_folder, is_transient, TransientFetchError
from tasks.track import parse_model_uri


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
    hub = Path(os.environ["HF_HOME"]) / "hub" / "models--pcbtest--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(base, hub / "snapshots" / commit, dirs_exist_ok=True)
    (hub / "refs").mkdir(parents=True, exist_ok=True)
    (hub / "refs" / "main").write_text(commit)
    for ref in ("pcbtest/tiny", "pcbtest/tiny@main", f"pcbtest/tiny@{commit}"):
        fetched = fetch_checkpoint.fn(ref, str(tmp_path))
        assert fetched.source == "hub" and fetched.revision == commit
        assert fetched.fingerprint == fingerprint_folder(base, tmp_path / "d")


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
