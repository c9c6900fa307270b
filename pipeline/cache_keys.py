"""Cache keys from content: what a merge's output depends on, named by fingerprints, never by paths."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.references import FetchedCheckpoint

PCBMERGE_VERSION = importlib.metadata.version("pcbmerge")


def merge_recipe(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], with_lambdas: bool = True) -> dict[str, Any]:
    """The merge as `MergeConfig.describe()` says, with every reference replaced by its content fingerprint
    (a `model+lora` reference by both: `MODEL+ADAPTER`), plus what else shapes the output when the file
    sets it: the output vocabulary, the chat template, the working dtypes, the slices, the module. Keys a
    file leaves out add nothing, so the recipes of merges without them stay as they were."""
    merge = config.merge_config().with_paths(lambda ref: inputs[ref].fingerprint)
    recipe = merge.describe()
    recipe["tokenizer"] = merge.tokenizer_source
    if merge.vocabulary is not None:
        vocabulary = merge.vocabulary
        tokens = [[token, setting.model_dump(mode="json")] for token, setting in vocabulary.tokens]
        recipe["vocabulary"] = {"source": vocabulary.source, "tokens": tokens, "pad_to_multiple_of": vocabulary.pad_to_multiple_of}
    if merge.chat_template is not None:
        recipe["chat_template"] = merge.chat_template
    for key in ("dtype", "compute_dtype"):
        if getattr(merge.raw, key) is not None:
            recipe[key] = getattr(merge.raw, key)
    if merge.sliced:
        recipe["slices"] = [[[[s.model, s.layer_range, s.parameters] for s in spec.sources], spec.parameters] for spec in merge.slices]
    if merge.module is not None:
        recipe["module"] = [merge.module, merge.module_parameters]
    recipe["pcbmerge"] = PCBMERGE_VERSION
    if not with_lambdas:
        for model in recipe["models"]:
            model["parameters"].pop("lambda", None)
    return recipe


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def task_files(include_path: str | None) -> list:
    """(path, size, mtime) of every file under an lm-eval include path: a cached score is stale once they change."""
    if not include_path or not Path(include_path).is_dir():
        return []
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(include_path).rglob("*") if p.is_file())
