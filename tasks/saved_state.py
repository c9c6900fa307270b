"""Progress saved in the flow's result storage (a Prefect filesystem block: local by default, S3/GCS/… if
configured): the search's state after every round, the tuner's after every stage and round, so a killed
or paused run resumes exactly. One JSON document per key."""

from __future__ import annotations


def _storage():
    from prefect.results import get_default_result_storage, get_result_store

    return get_result_store().result_storage or get_default_result_storage(_sync=True)


def write_state(path: str, document: bytes) -> None:
    """Write `document` at `path` in the result storage (replacing what was there)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    result = _storage().write_path(path, document)
    if hasattr(result, "__await__"):
        run_coro_as_sync(result)


def read_state(path: str) -> bytes | None:
    """The document at `path` in the result storage, or None when nothing was saved there."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        content = _storage().read_path(path)
        if hasattr(content, "__await__"):
            content = run_coro_as_sync(content)
    except (ValueError, OSError):  # LocalFileSystem: ValueError "path does not exist"
        return None
    return content
