"""`validate_checkpoints`: refuse incompatible inputs before any heavy work (`pipeline.validation`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.config import PipelineConfig
from pipeline.references import FetchedCheckpoint
from pipeline.validation import ValidatedInputs, validate


@task(cache_policy=NO_CACHE, task_run_name="validate inputs")
def validate_checkpoints(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint]) -> ValidatedInputs:
    """Same architecture, tensor names and shapes across the base and every model, or `MergeInputError`."""
    return validate(config, inputs)
