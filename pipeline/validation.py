"""Input validation: refuse incompatible checkpoints before any heavy work.

Checks that every input declares the same architecture as the base (`config.json`), then opens all
checkpoints lazily (`pcbcore.inputs.open_inputs`) so tensor names and shapes are compared from the
safetensors headers alone: no tensor is read. A `model+lora` adapter is checked against its model there
(every adapted tensor present, with the shape B·A gives).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pcbcore.errors import MergeInputError
from pcbcore.inputs import open_inputs
from pipeline.config import PipelineConfig
from pipeline.references import FetchedCheckpoint, checkpoint_of

ARCHITECTURE_KEYS = ("model_type", "architectures")


class ValidatedInputs(BaseModel):
    tensors_merged: int
    tensors_copied: int
    parameters_merged: int


def _architecture(checkpoint: FetchedCheckpoint) -> dict:
    path = Path(checkpoint.folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MergeInputError(f"config.json of model '{checkpoint.ref}' ({path}) is not valid JSON") from None
    return {key: data.get(key) for key in ARCHITECTURE_KEYS if key in data}


def validate(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint]) -> ValidatedInputs:
    """Same architecture, tensor names and shapes across the base and every model, or `MergeInputError`."""
    merge = config.merge_config()
    base = checkpoint_of(merge.base_model, inputs)
    expected = _architecture(base)
    for ref in merge.models:
        found = _architecture(checkpoint_of(ref, inputs))
        for key in ARCHITECTURE_KEYS:
            if key in expected and key in found and expected[key] != found[key]:
                raise MergeInputError(f"model '{ref}' has {key} {found[key]!r} but base model '{merge.base_model}' has {expected[key]!r}")
    opened = open_inputs(merge.with_paths(lambda ref: inputs[ref].folder))
    try:
        return ValidatedInputs(tensors_merged=len(opened.merged), tensors_copied=len(opened.passthrough), parameters_merged=opened.numel)
    finally:
        opened.close()
