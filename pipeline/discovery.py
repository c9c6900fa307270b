"""Discovery: what a watched source holds now, each checkpoint with the identity a merge records.

A source is one of
- a folder whose sub-folders are checkpoints (a sub-folder counts once it holds weight files; hidden
  folders, such as half-written temporaries, are skipped): `ref` is the sub-folder's absolute path and its
  identity is its content fingerprint (the same one `pipeline.references.fetch` records), so a checkpoint updated in
  place counts as changed;
- a Hugging Face Hub repo id (`org/name`): one checkpoint per branch, `ref` = `org/name@branch`, identity
  = the branch's commit hash. Online this asks the Hub (`list_repo_refs`, with the token from the
  environment or `hf auth login`; never a parameter); with `HF_HUB_OFFLINE=1` it reads the branches the
  local Hub cache knows;
- an MLflow registered model (`models:/NAME`): one checkpoint per version, `ref` = `models:/NAME/VERSION`,
  identity = `NAME/VERSION` (versions are immutable).

Identities match what a fetch writes into a merge's lineage: `revision` when the source has
one (Hub commit, registry version), else the content fingerprint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import BaseModel

from pcbcore.errors import MergeInputError
from pcbcore.lora import split_reference
from pipeline.fingerprints import WEIGHT_SUFFIXES, fingerprint_folder
from pipeline.references import HUB_ID
from pipeline.registry import registered_versions

REGISTERED_MODEL = re.compile(r"^models:/([^/@]+)/?$")


class DiscoveredCheckpoint(BaseModel):
    ref: str
    revision: str | None = None
    fingerprint: str | None = None

    @property
    def identity(self) -> str:
        return self.revision or self.fingerprint or self.ref


def source_kind(source: str) -> str:
    """`folder`, `hub` or `registry`, or one sentence saying what a source may be."""
    if REGISTERED_MODEL.match(source):
        return "registry"
    if Path(source).expanduser().is_dir():
        return "folder"
    if HUB_ID.match(source) and "@" not in source:
        return "hub"
    raise MergeInputError(f"watch source '{source}' is not a folder, a Hub repo id (org/name, without @revision) or a registered model (models:/NAME)")


def discover(source: str, cache_dir: str | Path) -> list[DiscoveredCheckpoint]:
    """The checkpoints in `source` now, sorted by ref."""
    kind = source_kind(source)
    if kind == "folder":
        found = list_folder(Path(source).expanduser().resolve(), Path(cache_dir) / "digests")
    elif kind == "hub":
        found = list_hub_branches(source)
    else:
        name = REGISTERED_MODEL.match(source).group(1)
        found = [DiscoveredCheckpoint(ref=f"models:/{name}/{v}", revision=f"{name}/{v}") for v in registered_versions(name)]
    return sorted(found, key=lambda c: c.ref)


def list_folder(folder: Path, digest_dir: Path) -> list[DiscoveredCheckpoint]:
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) for f in sub.iterdir()):
            found.append(DiscoveredCheckpoint(ref=str(sub), fingerprint=fingerprint_folder(sub, digest_dir)))
    return found


def list_hub_branches(repo_id: str) -> list[DiscoveredCheckpoint]:
    """One checkpoint per branch of a Hub model repo (from the Hub, or from the local cache when offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        refs = cached_hub_branches(repo_id)
        if not refs:
            raise MergeInputError(f"watch source '{repo_id}': offline (HF_HUB_OFFLINE) and no branch of it is in the local Hub cache")
    else:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            listed = HfApi().list_repo_refs(repo_id, repo_type="model")
        except RepositoryNotFoundError:
            raise MergeInputError(f"watch source '{repo_id}' is not a Hub model repository you can read") from None
        refs = {branch.name: branch.target_commit for branch in listed.branches}
    return [DiscoveredCheckpoint(ref=f"{repo_id}@{name}", revision=commit) for name, commit in refs.items()]


def cached_hub_branches(repo_id: str) -> dict[str, str]:
    """branch -> commit, as recorded in the local Hub cache (`models--org--name/refs/<branch>`)."""
    from huggingface_hub import constants

    refs_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    if not refs_dir.is_dir():
        return {}
    branches = {}
    for path in sorted(refs_dir.rglob("*")):
        name = path.relative_to(refs_dir).as_posix()
        if path.is_file() and not name.startswith("pr/"):
            branches[name] = path.read_text().strip()
    return branches


def same_checkpoint(path_a: str, path_b: str) -> bool:
    try:
        return os.path.samefile(path_a, path_b)
    except OSError:
        return False


def reference_identity(ref: str, cache_dir: str | Path) -> str:
    """What a merge's lineage records for a reference: a local folder's content fingerprint, else the
    reference as written (a Hub branch or a registry alias is only resolved by the fetch itself). A
    `model+lora` reference is the model's identity and its adapter's, as its lineage records the two."""
    model, lora = split_reference(ref)
    if lora is not None:
        return f"{reference_identity(model, cache_dir)}+{reference_identity(lora, cache_dir)}"
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return fingerprint_folder(folder.resolve(), Path(cache_dir) / "digests")
    return ref


def merge_identity(method: str, parameters: dict, base: str, models: list[tuple[str, dict]], searched: bool = False) -> tuple:
    """A merge by content: method, parameters, the base's identity and each model's (identity, parameters),
    never the paths the checkpoints sit under. For a searched merge the per-model λ is the search's answer,
    not an input, so it is left out."""

    def model_params(params: dict) -> str:
        return json.dumps({k: v for k, v in params.items() if not (searched and k == "lambda")}, sort_keys=True)

    return (method, json.dumps(parameters, sort_keys=True), base, sorted((identity, model_params(params)) for identity, params in models))


def lineage_identity(lineage: dict, searched: bool = False) -> tuple:
    """`merge_identity` of what a registered merge's lineage says it was made of."""
    inputs = lineage.get("inputs", [])

    def identity(item: dict) -> str:
        return item.get("revision") or item["fingerprint"]

    adapters = {item["ref"]: identity(item) for item in inputs if item.get("role") == "lora"}

    def with_adapter(item: dict) -> str:  # a model+lora input: "model+adapter", as `reference_identity` says it
        return identity(item) if item.get("adapter") is None else f"{identity(item)}+{adapters.get(item['adapter'], '')}"

    base = next((item for item in inputs if item.get("role") == "base"), None)
    models = [(with_adapter(item), item.get("parameters") or {}) for item in inputs if item.get("role") == "model"]
    return merge_identity(str(lineage.get("method")), lineage.get("parameters") or {}, with_adapter(base) if base else "", models, searched)
