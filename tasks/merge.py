"""`merge_checkpoint`: write the merged Hugging Face folder (streamed, atomic) or reuse a finished one
(`pipeline.outputs`); `merge_layer_groups`: the merge of a per-layer-group λ genome, from stored components;
`apply_lora`: a `model+lora` reference written as a checkpoint, to score it as a baseline. Cached on the
recipe (for `apply_lora`, both fingerprints) while the folder it names still holds that merge."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.cache_keys import digest
from pipeline.config import PipelineConfig
from pipeline.outputs import MergedCheckpoint, adapted_folder, finished_merge, output_folder, write_adapted, write_layer_group_merge, write_merge
from pipeline.references import FetchedCheckpoint


def _while_finished(prefix: str, key: str, folder) -> str | None:
    """A task's cache key for a written folder: its recipe `key`, and only while `folder` still holds that
    finished merge (else: write it again)."""
    return f"{prefix}-{key}-{digest(str(folder))[:16]}" if finished_merge(folder, key) else None


def _merge_cache_key(context, parameters) -> str | None:
    return _while_finished("merge", *output_folder(parameters["config"], parameters["inputs"], parameters["cache_dir"]))


@task(cache_key_fn=_merge_cache_key, persist_result=True, task_run_name="merge {config.merge_method}")
def merge_checkpoint(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str) -> MergedCheckpoint:
    """Merge the fetched inputs as `config` says into its output folder; reuse it when already finished."""
    return write_merge(config, inputs, cache_dir, device, get_run_logger())


@task(cache_policy=NO_CACHE, task_run_name="merge layer groups")
def merge_layer_groups(
    config: PipelineConfig,
    layer_groups: int,
    components_folder: str,
    components_key: str,
    genome: list[float],
    tokenizer_folder: str,
    cache_dir: str,
    device: str,
) -> MergedCheckpoint:
    """Write the merge a per-layer-group genome names (the streaming merge takes one λ per model, so this one
    is built from the stored components, like a candidate, and saved with transformers)."""
    return write_layer_group_merge(config, layer_groups, components_folder, components_key, genome, tokenizer_folder, cache_dir, device, get_run_logger())


def _adapted_cache_key(context, parameters) -> str | None:
    return _while_finished("adapted", *adapted_folder(parameters["ref"], parameters["inputs"], parameters["cache_dir"]))


@task(cache_key_fn=_adapted_cache_key, persist_result=True, task_run_name="apply lora {ref}")
def apply_lora(ref: str, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str) -> MergedCheckpoint:
    """The model of a `model+lora` reference with its adapter applied, written once into the cache."""
    return write_adapted(ref, inputs, cache_dir, device, get_run_logger())
