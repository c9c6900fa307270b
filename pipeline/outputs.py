"""Merge outputs of the pipeline: where a merge is written (a folder named by its recipe's digest, or the
config's `output`), whether a folder already holds the finished merge of a recipe, and writing one.

The output's identity is its recipe: the method, its parameters, λ and the inputs' content fingerprints.
Its digest (the merge key) is written into the folder's `pcbmerge_config.yml` as the first line, inside
the same atomic rename as the weights, so a folder carrying the key is a finished merge of that recipe:
a re-run (after a crash, or with `--out` pointing at it) reuses it instead of merging again.

A `model+lora` reference scored as a baseline is written the same way (`write_adapted`): its adapter
applied to its model once, into a cache folder keyed on both fingerprints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from pcbcore.checkpoint import atomic_output
from pcbcore.components import StoredComponents
from pcbcore.config import parse_merge_config
from pcbcore.device import resolve_device
from pcbcore.executor import merge_to_folder
from pipeline.cache_keys import PCBMERGE_VERSION, digest, merge_recipe
from pipeline.candidates import build_candidate
from pipeline.config import PipelineConfig
from pipeline.fingerprints import fingerprint_folder
from pipeline.locks import exclusive
from pipeline.model_pool import load_candidate_model, load_tokenizer
from pipeline.references import FetchedCheckpoint, adapter_of, checkpoint_of

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


class ProgressLog:
    """Merge progress into the task's log, at most every few seconds."""

    def __init__(self, logger, every: float = 5.0):
        self.logger, self.every, self.last = logger, every, time.perf_counter()

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - self.last > self.every:
            self.last = now
            self.logger.info("%s: %d/%d tensors", phase, done, total)


def write_merge(
    config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str, logger: logging.Logger | logging.LoggerAdapter
) -> MergedCheckpoint:
    """Merge the fetched inputs as `config` says into its output folder; reuse it when already finished."""
    merge = config.merge_config().with_paths(lambda ref: inputs[ref].folder)
    key, folder = output_folder(config, inputs, cache_dir)
    started = time.perf_counter()
    # One writer per output folder: a second identical run waits here, then finds the merge finished.
    with exclusive(f"merge\n{folder}"):
        reused = finished_merge(folder, key)
        if reused:
            logger.info("reusing the finished merge in %s", folder)
        else:
            ours = not config.output  # a key-named cache folder without the key is a stale leftover: replace it
            text = KEY_LINE + key + "\n" + yaml.safe_dump(config.merge_data(), sort_keys=False)
            report = merge_to_folder(merge, folder, device=device, overwrite=config.overwrite or ours, progress=ProgressLog(logger), config_text=text)
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


def write_layer_group_merge(
    config: PipelineConfig,
    layer_groups: int,
    components_folder: str,
    components_key: str,
    genome: list[float],
    tokenizer_folder: str,
    cache_dir: str,
    device: str,
    logger: logging.Logger | logging.LoggerAdapter,
) -> MergedCheckpoint:
    """Write the merge a per-layer-group genome names (the streaming merge takes one λ per model, so this one
    is built from the stored components, like a candidate, and saved with transformers)."""
    groups = layer_groups
    key = digest([components_key, groups, [float(x) for x in genome]])
    folder = Path(config.output).expanduser().resolve() if config.output else Path(cache_dir) / "merges" / key[:24]
    marker = folder / "pcbmerge_search.json"
    started = time.perf_counter()
    reused = marker.is_file() and marker.read_text().strip() == key
    if not reused:
        stored = StoredComponents(components_folder, device=str(resolve_device(device)))
        model = load_candidate_model(str(stored.base_dir), "cpu", "auto", stored.vocab_rows)
        build_candidate(model, stored, genome, groups)
        with atomic_output(folder, overwrite=config.overwrite or not config.output) as tmp:
            model.to("cpu").save_pretrained(tmp)
            # the merge's own tokenizer (a vocabulary, a chat template) where it has one, as the candidates had
            load_tokenizer(str(stored.side_files) if stored.side_files is not None else tokenizer_folder).save_pretrained(tmp)
            (tmp / "pcbmerge_search.json").write_text(key + "\n")
        logger.info("wrote the %d-group merge to %s", groups, folder)
    return MergedCheckpoint(
        folder=str(folder),
        key=key,
        fingerprint=fingerprint_folder(folder, Path(cache_dir) / "digests"),
        method=config.merge_method,
        lambdas=[float(x) for x in genome],
        reused=reused,
        seconds=round(time.perf_counter() - started, 3),
    )


def adapted_folder(ref: str, inputs: dict[str, FetchedCheckpoint], cache_dir: str) -> tuple[str, Path]:
    """(key, folder) of a `model+lora` reference written as a checkpoint: keyed on both fingerprints."""
    model, adapter = checkpoint_of(ref, inputs), adapter_of(ref, inputs)
    assert adapter is not None, ref
    key = digest({"lora_applied": [model.fingerprint, adapter.fingerprint], "pcbmerge": PCBMERGE_VERSION})
    return key, Path(cache_dir) / "adapted" / key[:24]


def write_adapted(
    ref: str, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str, logger: logging.Logger | logging.LoggerAdapter
) -> MergedCheckpoint:
    """A `model+lora` reference as a checkpoint of its own (to score it as a baseline): pcbcore's merge of
    that one reference alone (`passthrough`), so every tensor is exactly what the merge read (W + s·B·A,
    rounded once to W's dtype) and the side files are the model's. Written once into the cache."""
    model, adapter = checkpoint_of(ref, inputs), adapter_of(ref, inputs)
    key, folder = adapted_folder(ref, inputs, cache_dir)
    started = time.perf_counter()
    with exclusive(f"merge\n{folder}"):
        reused = finished_merge(folder, key)
        if not reused:
            merge = parse_merge_config({"merge_method": "passthrough", "models": [{"model": f"{model.folder}+{adapter.folder}"}]}, source=ref)
            text = KEY_LINE + key + "\n" + yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": ref}]}, sort_keys=False)
            merge_to_folder(merge, folder, device=device, overwrite=True, progress=ProgressLog(logger), config_text=text)
            logger.info("applied LoRA %s to %s in %s", adapter.ref, model.ref, folder)
    return MergedCheckpoint(
        folder=str(folder),
        key=key,
        fingerprint=fingerprint_folder(folder, Path(cache_dir) / "digests"),
        method="passthrough",
        lambdas=[1.0],
        reused=reused,
        seconds=round(time.perf_counter() - started, 3),
    )
