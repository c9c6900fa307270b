"""`fetch_checkpoint`: a checkpoint reference resolved to a local folder and fingerprinted
(`pipeline.references.fetch`), retried on transient errors only and cached for local folders.

The fetch of a local folder is cached on the reference as written, the folder it resolves to and every
content file's stat signature (size, mtime, ctime, inode). Only transient errors (a dropped connection, a
5xx from the Hub or the tracking server, `TransientFetchError`) are retried.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from pipeline.fingerprints import stat_signature
from pipeline.references import FetchedCheckpoint, fetch
from pipeline.retry import is_transient, retry_when

# Retry delays grow 1 s, 2 s, 4 s (with jitter): enough for a flaky network or a restarting server.
RETRIES = 3
BACKOFF_SECONDS = 1.0


def _fetch_cache_key(context, parameters) -> str | None:
    """A local folder is keyed on the reference as written (the result names it, and the flows look their
    inputs up by it), the folder it resolves to, and every content file's stat signature (cheap to read).
    Hub refs and models:/ URIs may move (a branch, an alias), so they are resolved every time (from the
    Hub cache when offline)."""
    ref = parameters["ref"]
    folder = Path(ref).expanduser()
    if ref.startswith("models:/") or not folder.is_dir():
        return None
    return "fetch-" + hashlib.sha256(json.dumps([ref, str(folder.resolve()), stat_signature(folder)]).encode()).hexdigest()


@task(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_when(is_transient),
    cache_key_fn=_fetch_cache_key,
    persist_result=True,
    task_run_name="fetch {ref}",
)
def fetch_checkpoint(ref: str, cache_dir: str) -> FetchedCheckpoint:
    """Resolve `ref` to a local folder and fingerprint its files."""
    return fetch(ref, cache_dir)
