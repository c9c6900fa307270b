"""Cache keys from content: what a merge's output depends on, named by fingerprints, never by paths."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import Any

from pcbmerge.pipeline_config import PipelineConfig
from tasks.fetch import FetchedCheckpoint

PCBMERGE_VERSION = importlib.metadata.version("pcbmerge")


def merge_recipe(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], with_lambdas: bool = True) -> dict[str, Any]:
    """The merge as `MergeConfig.describe()` says, with every reference replaced by its content fingerprint."""
    merge = config.merge_config().with_paths(lambda ref: inputs[ref].fingerprint)
    recipe = merge.describe()
    recipe["tokenizer"] = merge.tokenizer_source
    recipe["pcbmerge"] = PCBMERGE_VERSION
    if not with_lambdas:
        for model in recipe["models"]:
            model["parameters"].pop("lambda", None)
    return recipe


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
