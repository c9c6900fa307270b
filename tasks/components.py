"""`compute_components`: store the components C_i of eq. (1) once, for a coefficient search.

Components depend on the inputs and the method's parameters but not on λ, so they are keyed on the
merge recipe without λ and computed once; `pcbcore.executor.StoredComponents` then builds any candidate
in memory.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from pcbcore.components import COMPONENTS_FORMAT, COMPONENTS_MANIFEST
from pcbcore.components import compute_components as store_components
from pipeline.cache_keys import digest, merge_recipe
from pipeline.config import PipelineConfig
from pipeline.references import FetchedCheckpoint


class StoredComponentsRef(BaseModel):
    folder: str
    key: str
    reused: bool


def components_folder(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str) -> tuple[str, Path]:
    key = digest({**merge_recipe(config, inputs, with_lambdas=False), "components_format": COMPONENTS_FORMAT})
    return key, Path(cache_dir) / "components" / key[:24]


def _components_cache_key(context, parameters) -> str | None:
    key, folder = components_folder(parameters["config"], parameters["inputs"], parameters["cache_dir"])
    return f"components-{key}" if (folder / COMPONENTS_MANIFEST).is_file() else None


@task(cache_key_fn=_components_cache_key, persist_result=True, task_run_name="components {config.merge_method}")
def compute_components(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str) -> StoredComponentsRef:
    """C_i for every merged tensor, stored under the cache (the manifest is written last, atomically)."""
    key, folder = components_folder(config, inputs, cache_dir)
    if (folder / COMPONENTS_MANIFEST).is_file():
        return StoredComponentsRef(folder=str(folder), key=key, reused=True)
    merge = config.merge_config().with_paths(lambda ref: inputs[ref].folder)
    store_components(merge, folder, device=device, overwrite=True)
    get_run_logger().info("stored components of %d models in %s", len(merge.models), folder)
    return StoredComponentsRef(folder=str(folder), key=key, reused=False)
