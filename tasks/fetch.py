"""`fetch_checkpoint`: turn a checkpoint reference into a local folder and a content fingerprint.

A reference is one of
- a local folder (`path/to/model`);
- a Hugging Face Hub id with optional revision (`org/name` or `org/name@rev`), through
  `huggingface_hub.snapshot_download`, which honours its cache and `HF_HUB_OFFLINE`;
- an MLflow registered model (`models:/NAME/VERSION` or `models:/NAME@alias`), so a merged model can be
  merged again; it is downloaded once into the cache folder.

The fingerprint is a sha256 over the sha256 of every weight and JSON file at the folder's top level.
Hashing gigabytes on every run would be slow, so each file's digest is stored beside the cache and reused
while the file's size, mtime, ctime and inode are unchanged; the fetch of a local folder is cached on the
same signatures and on the reference as written.

Only transient errors (a dropped connection, a 5xx from the Hub or the tracking server,
`TransientFetchError`) are retried; a reference that resolves to nothing fails at once, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from pcbcore.errors import MergeInputError
from tasks import track

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")
# Retry delays grow 1 s, 2 s, 4 s (with jitter): enough for a flaky network or a restarting server.
RETRIES = 3
BACKOFF_SECONDS = 1.0


class TransientFetchError(RuntimeError):
    """A source that may answer on the next try (network hiccup, server restarting): retried."""


class RegisteredModel(BaseModel):
    name: str
    version: str


class FetchedCheckpoint(BaseModel):
    """A reference resolved to a local folder, with what lineage needs to name it exactly."""

    ref: str
    folder: str
    source: str  # local | hub | registry | <custom source name>
    revision: str | None = None
    fingerprint: str
    files: dict[str, str]  # file name -> sha256
    registered: RegisteredModel | None = None

    @property
    def label(self) -> str:
        """A short name for tables and metrics: the folder or repo name, or NAME-vVERSION."""
        if self.registered:
            return f"{self.registered.name}-v{self.registered.version}"
        tail = self.ref.rstrip("/").split("@")[0].rsplit("/", 1)[-1]
        return re.sub(r"[^\w.-]", "_", tail) or "model"


@dataclass(frozen=True)
class Resolved:
    folder: Path
    revision: str | None = None
    registered: RegisteredModel | None = None


@dataclass(frozen=True)
class Source:
    """A kind of reference: `matches(ref)` says whether it is one, `resolve(ref, cache_dir)` fetches it."""

    name: str
    matches: Callable[[str], bool]
    resolve: Callable[[str, Path], Resolved]


def resolve_local(ref: str, cache_dir: Path) -> Resolved:
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise MergeInputError(f"checkpoint reference '{ref}' is not a folder")
    return Resolved(folder.resolve())


def resolve_hub(ref: str, cache_dir: Path) -> Resolved:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = ref.partition("@")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None))
    except LocalEntryNotFoundError:
        raise MergeInputError(
            f"checkpoint reference '{ref}' is neither a local folder nor a Hub model in the local cache (offline, or not downloaded)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise MergeInputError(f"checkpoint reference '{ref}': {str(exc).splitlines()[0]}") from None
    # snapshots/<commit hash>: the exact revision whatever branch or tag was asked
    return Resolved(folder, revision=folder.name)


def resolve_registered(ref: str, cache_dir: Path) -> Resolved:
    name, version, folder = track.download_registered_model(ref, cache_dir / "registry")
    return Resolved(folder, revision=f"{name}/{version}", registered=RegisteredModel(name=name, version=version))


def _looks_local(ref: str) -> bool:
    return Path(ref).expanduser().exists() or not HUB_ID.match(ref)


# Tried in order; the first whose `matches` says yes resolves the reference. Tests may add their own source.
SOURCES: list[Source] = [
    Source("registry", lambda ref: ref.startswith("models:/"), resolve_registered),
    Source("local", _looks_local, resolve_local),
    Source("hub", lambda ref: bool(HUB_ID.match(ref)), resolve_hub),
]


def is_transient(exc: BaseException) -> bool:
    """Errors worth another try: connection trouble and server-side failures, never bad input."""
    if isinstance(exc, MergeInputError):
        return False
    if isinstance(exc, (TransientFetchError, ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return track.is_transient_tracking_error(exc)


def _retry_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry only when the failure is transient."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def _fetch_cache_key(context, parameters) -> str | None:
    """A local folder is keyed on the reference as written (the result names it, and the flows look their
    inputs up by it), the folder it resolves to, and every content file's stat signature (cheap to read).
    Hub refs and models:/ URIs may move (a branch, an alias), so they are resolved every time (from the
    Hub cache when offline)."""
    ref = parameters["ref"]
    folder = Path(ref).expanduser()
    if ref.startswith("models:/") or not folder.is_dir():
        return None
    return "fetch-" + hashlib.sha256(json.dumps([ref, str(folder.resolve()), _stat_signature(folder)]).encode()).hexdigest()


@task(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient,
    cache_key_fn=_fetch_cache_key,
    persist_result=True,
    task_run_name="fetch {ref}",
)
def fetch_checkpoint(ref: str, cache_dir: str) -> FetchedCheckpoint:
    """Resolve `ref` to a local folder and fingerprint its files."""
    cache = Path(cache_dir)
    source = next((s for s in SOURCES if s.matches(ref)), None)
    if source is None:
        raise MergeInputError(f"checkpoint reference '{ref}' is not a folder, a Hub id (org/name@rev) or a models:/ URI")
    resolved = source.resolve(ref, cache)
    files = fingerprint_files(resolved.folder, cache / "digests")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise MergeInputError(f"checkpoint reference '{ref}' resolved to {resolved.folder}, which holds no weight files")
    return FetchedCheckpoint(
        ref=ref,
        folder=str(resolved.folder),
        source=source.name,
        revision=resolved.revision,
        fingerprint=combine_digests(files),
        files=files,
        registered=resolved.registered,
    )


# ---------------------------------------------------------------- fingerprints


def fingerprint_folder(folder: str | Path, digest_dir: str | Path) -> str:
    """The content fingerprint of a checkpoint folder (see the module docstring)."""
    return combine_digests(fingerprint_files(Path(folder), Path(digest_dir)))


def combine_digests(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in sorted(files.items())).encode()).hexdigest()


def fingerprint_files(folder: Path, digest_dir: Path) -> dict[str, str]:
    """sha256 of each weight and JSON file at the top of `folder` (symlinks, as in the Hub cache, followed)."""
    return {path.name: file_digest(path, digest_dir) for path in _content_files(folder)}


def _content_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.suffix == ".json"))


def _stat_signature(folder: Path) -> list:
    return [(p.name, _file_signature(p.resolve())) for p in _content_files(folder)]


def _file_signature(real: Path) -> dict:
    """What changes whenever a file's bytes may have: size and mtime, and also inode and ctime, since a copy
    that keeps time stamps (`cp -p`, `rsync -a`, `tar x`) can put other bytes of the same size under the
    same mtime, while any write or replacement sets the ctime (which no tool can set back)."""
    stat = real.stat()
    return {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


_digest_lock = threading.Lock()


def file_digest(path: Path, digest_dir: Path) -> str:
    """sha256 of a file, reusing the stored digest while its signature (size, mtime, ctime, inode) is unchanged."""
    real = path.resolve()
    record = digest_dir / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
    signature = _file_signature(real)
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
        except json.JSONDecodeError:
            stored = {}
        if {k: stored.get(k) for k in signature} == signature and isinstance(stored.get("sha256"), str):
            return stored["sha256"]
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _digest_lock:
        digest_dir.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({**signature, "sha256": value}))
        tmp.replace(record)
    return value
