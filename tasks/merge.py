"""`merge_checkpoint`: write the merged Hugging Face folder (streamed, atomic) or reuse a finished one.

The output's identity is its recipe: the method, its parameters, λ and the inputs' content fingerprints.
Its digest (the merge key) is written into the folder's `pcbmerge_config.yml` as the first line, inside
the same atomic rename as the weights, so a folder carrying the key is a finished merge of that recipe:
a re-run (after a crash, or with `--out` pointing at it) reuses it instead of merging again.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from pydantic import BaseModel

from pcbcore.executor import merge_to_folder
from pcbmerge.pipeline_config import PipelineConfig
from tasks._keys import digest, merge_recipe
from tasks.fetch import FetchedCheckpoint, fingerprint_folder

CONFIG_FILE = "pcbmerge_config.yml"
KEY_LINE = "# pcbmerge merge key: "


class MergedCheckpoint(BaseModel):
    folder: str
    key: str
    fingerprint: str
    method: str
    lambdas: list[float]
    reused: bool
    seconds: float


def output_folder(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str) -> tuple[str, Path]:
    """(merge key, output folder): `config.output`, else a folder named by the key under the cache."""
    key = digest(merge_recipe(config, inputs))
    folder = Path(config.output).expanduser().resolve() if config.output else Path(cache_dir) / "merges" / key[:24]
    return key, folder


def finished_merge(folder: Path, key: str) -> bool:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return False
    with path.open() as handle:
        return handle.readline().strip() == (KEY_LINE + key).strip()


def _merge_cache_key(context, parameters) -> str | None:
    """Keyed on the recipe, and only while the folder it names is still there (else: merge again)."""
    key, folder = output_folder(parameters["config"], parameters["inputs"], parameters["cache_dir"])
    return f"merge-{key}-{digest(str(folder))[:16]}" if finished_merge(folder, key) else None


class _ProgressLog:
    """Merge progress into the task's log, at most every few seconds."""

    def __init__(self, logger, every: float = 5.0):
        self.logger, self.every, self.last = logger, every, time.perf_counter()

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - self.last > self.every:
            self.last = now
            self.logger.info("%s: %d/%d tensors", phase, done, total)


@task(cache_key_fn=_merge_cache_key, persist_result=True, task_run_name="merge {config.merge_method}")
def merge_checkpoint(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str) -> MergedCheckpoint:
    """Merge the fetched inputs as `config` says into its output folder; reuse it when already finished."""
    logger = get_run_logger()
    merge = config.merge_config().with_paths(lambda ref: inputs[ref].folder)
    key, folder = output_folder(config, inputs, cache_dir)
    started = time.perf_counter()
    reused = finished_merge(folder, key)
    if reused:
        logger.info("reusing the finished merge in %s", folder)
    else:
        ours = not config.output  # a key-named cache folder without the key is a stale leftover: replace it
        text = KEY_LINE + key + "\n" + yaml.safe_dump(config.merge_data(), sort_keys=False)
        report = merge_to_folder(merge, folder, device=device, overwrite=config.overwrite or ours, progress=_ProgressLog(logger), config_text=text)
        logger.info("merged %d tensors with %s in %.1fs on %s", report.tensors_merged, report.method, report.seconds, report.device)
    return MergedCheckpoint(
        folder=str(folder),
        key=key,
        fingerprint=fingerprint_folder(folder, Path(cache_dir) / "digests"),
        method=merge.method_name,
        lambdas=merge.lambdas,
        reused=reused,
        seconds=round(time.perf_counter() - started, 3),
    )
