"""Exclusive locks between the processes of one machine (or of one shared cache folder): a file lock per
name under `$PCBMERGE_CACHE_DIR/locks`, held while a process does what two identical runs must not do twice
at once (register the same content, write the same merge)."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.settings import load_settings


@contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold the lock called `name` (any string) until the block ends; waits while another process holds it."""
    path = load_settings().cache_dir / "locks" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
