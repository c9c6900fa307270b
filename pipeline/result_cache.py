"""The evaluation result cache: one JSON file per (model, tokenizer, task, split, limit, few-shot, lm-eval
version), written atomically, so a hit never calls the harness and parallel evaluations never read half a file.
Beside them, the size of each (task, split) once it has been run, so that a `limit` at or above it is keyed
as no limit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.scores import TaskScore

log = logging.getLogger(__name__)

# Bumped whenever what a cached entry means changes.
CACHE_SCHEMA = 1


def cache_folder(cache_dir: Path | None) -> Path:
    """The folder of cached results (default: `$PCBMERGE_CACHE_DIR/eval`), created if missing."""
    if cache_dir is None:
        from pipeline.settings import load_settings

        cache_dir = load_settings().cache_dir / "eval"
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def result_key(base_key: dict[str, Any], task_identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**base_key, "task": task_identity}, sort_keys=True).encode()).hexdigest()


def read_result(cache: Path, key: str) -> TaskScore | None:
    path = cache / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return TaskScore.model_validate(json.loads(path.read_text(encoding="utf-8"))["score"])
    except (json.JSONDecodeError, KeyError, ValueError):
        log.warning("ignoring unreadable cache entry %s", path)
        return None


def write_result(cache: Path, key: str, score: TaskScore, lm_eval_version: str) -> None:
    """Write atomically (temp file + rename) so parallel evaluations never read half a file."""
    _write_json(cache / f"{key}.json", {"lm_eval": lm_eval_version, "score": score.model_dump()})


def _size_path(cache: Path, task_identity: dict[str, Any], split: str) -> Path:
    key = hashlib.sha256(json.dumps({"schema": CACHE_SCHEMA, "task": task_identity, "split": split}, sort_keys=True).encode()).hexdigest()
    return cache / "sizes" / f"{key}.json"


def read_split_size(cache: Path, task_identity: dict[str, Any], split: str) -> int | None:
    """The number of examples in the task's split, if a run has recorded it (the identity covers its data)."""
    path = _size_path(cache, task_identity, split)
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["size"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError):
        return None


def write_split_size(cache: Path, task_identity: dict[str, Any], split: str, size: int) -> None:
    path = _size_path(cache, task_identity, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"size": int(size)})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)
