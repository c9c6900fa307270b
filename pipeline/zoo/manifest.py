"""`zoo.json`: what a zoo folder holds, and `load_zoo` to read it back with absolute paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pcbcore.errors import MergeInputError
from pipeline.zoo.lm_eval_tasks import write_task_yamls
from pipeline.zoo.problems import TaskKind, TaskSpec
from pipeline.zoo.training import ModelShape, TrainSettings

log = logging.getLogger(__name__)

MANIFEST = "zoo.json"


class ZooManifest(BaseModel):
    """The contents of `zoo.json`; folders are relative to the zoo folder so it can be moved."""

    model_config = ConfigDict(extra="forbid")

    base: str
    experts: dict[str, str]
    tasks: list[str]
    task_dir: str
    task_kinds: dict[str, TaskKind]
    size: str
    seed: int
    shape: ModelShape
    task_spec: TaskSpec
    pretrain: TrainSettings
    finetune: TrainSettings
    split_sizes: dict[str, int]
    max_gen_toks: int
    final_loss: dict[str, float]
    weights_sha256: dict[str, str]
    build_seconds: float


class Zoo(BaseModel):
    """A loaded zoo with absolute paths: what the pipeline, the search and the tests use."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: list[str]
    task_dir: Path
    manifest: ZooManifest


def load_zoo(zoo_dir: str | Path) -> Zoo:
    """Read `zoo_dir/zoo.json`; if the folder was moved since the build, re-point its task YAMLs at it."""
    root = Path(zoo_dir).expanduser().resolve()
    path = root / MANIFEST
    if not path.is_file():
        raise MergeInputError(f"{path} does not exist; build a zoo with `pcbmerge zoo build {zoo_dir}`.")
    try:
        manifest = ZooManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise MergeInputError(f"{path} is not a valid zoo manifest: {exc}") from exc
    task_dir = root / manifest.task_dir
    _repoint_task_yamls(task_dir, manifest)
    return Zoo(
        root=root,
        base=root / manifest.base,
        experts={task: root / folder for task, folder in manifest.experts.items()},
        tasks=list(manifest.tasks),
        task_dir=task_dir,
        manifest=manifest,
    )


def _repoint_task_yamls(task_dir: Path, manifest: ZooManifest) -> None:
    """lm-eval needs absolute data paths; rewrite the YAMLs when they point at another (old) location."""
    for task in manifest.tasks:
        yaml_path = task_dir / f"{task}.yaml"
        if not yaml_path.is_file():
            raise MergeInputError(f"zoo task file {yaml_path} is missing.")
        data_files = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))["dataset_kwargs"]["data_files"]
        if all(Path(p).parent == task_dir / "data" / task for p in data_files.values()):
            continue
        log.info("zoo moved: rewriting task YAMLs in %s to point at their data", task_dir)
        write_task_yamls(task_dir, manifest.task_kinds, task_dir, manifest.max_gen_toks)
        return
