"""Checkpoint references: turn one into a local folder and a content fingerprint (`fetch`).

A reference is one of
- a local folder (`path/to/model`);
- a Hugging Face Hub id with optional revision (`org/name` or `org/name@rev`), through
  `huggingface_hub.snapshot_download`, which honours its cache and `HF_HUB_OFFLINE`;
- an MLflow registered model (`models:/NAME/VERSION` or `models:/NAME@alias`), so a merged model can be
  merged again; it is downloaded once into the cache folder.

A config's `model+lora` reference is two references, the model and its peft LoRA adapter, each fetched
and fingerprinted on its own (`checkpoint_of`, `adapter_of`).

The fingerprint is `pipeline.fingerprints.combine_digests` over the folder's weight and JSON files.
A reference that resolves to nothing fails at once, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pcbcore.card import HUB_ID
from pcbcore.errors import MergeInputError
from pcbcore.lora import split_reference
from pipeline import registry
from pipeline.fingerprints import WEIGHT_SUFFIXES, combine_digests, fingerprint_files


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
    name, version, folder = registry.download_registered_model(ref, cache_dir / "registry")
    return Resolved(folder, revision=f"{name}/{version}", registered=RegisteredModel(name=name, version=version))


def _looks_local(ref: str) -> bool:
    return Path(ref).expanduser().exists() or not HUB_ID.match(ref)


# Tried in order; the first whose `matches` says yes resolves the reference. Tests may add their own source.
SOURCES: list[Source] = [
    Source("registry", lambda ref: ref.startswith("models:/"), resolve_registered),
    Source("local", _looks_local, resolve_local),
    Source("hub", lambda ref: bool(HUB_ID.match(ref)), resolve_hub),
]


def checkpoint_of(ref: str, inputs: dict[str, FetchedCheckpoint]) -> FetchedCheckpoint:
    """The fetched model of a model reference (of `model+lora`, the model; its adapter is `adapter_of`)."""
    return inputs[split_reference(ref)[0]]


def adapter_of(ref: str, inputs: dict[str, FetchedCheckpoint]) -> FetchedCheckpoint | None:
    """The fetched LoRA adapter of a `model+lora` reference (None for a plain model)."""
    lora = split_reference(ref)[1]
    return None if lora is None else inputs[lora]


def reference_label(ref: str, inputs: dict[str, FetchedCheckpoint]) -> str:
    """A model reference's `label`; `model+lora` is both labels joined by '_' (metric names allow no '+')."""
    adapter = adapter_of(ref, inputs)
    model = checkpoint_of(ref, inputs).label
    return model if adapter is None else f"{model}_{adapter.label}"


def input_labels(refs: list[str], inputs: dict[str, FetchedCheckpoint], reserved: set[str]) -> list[tuple[str, str]]:
    """(label, ref) for each input model: its `label`, made unique among themselves and `reserved` (the
    table's other rows, e.g. "base") by appending underscores."""
    taken, pairs = set(reserved), []
    for ref in refs:
        label = reference_label(ref, inputs)
        while label in taken:
            label += "_"
        taken.add(label)
        pairs.append((label, ref))
    return pairs


def fetch(ref: str, cache_dir: str | Path) -> FetchedCheckpoint:
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
