"""`merge_flow`: fetch → validate → merge → evaluate → track and register, as Prefect tasks.

Run it with `pcbmerge run CONFIG.yml`, or as a deployment (the `PipelineConfig` parameter renders as a
form in the Prefect UI). Without a Prefect server it runs in Prefect's ephemeral local mode; MLflow
tracking goes where `pipeline.settings` says (`sqlite:///$PCBMERGE_HOME/mlflow.db` by default).
"""

# No `from __future__ import annotations`: a served flow is pickled by value into its run process, and
# pydantic must find the parameter and return classes themselves there, not names to look up.

import yaml
from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.run_context import prefect_tags, tracked_params
from pipeline.config import PipelineConfig
from pipeline.lineage import lineage_node
from pipeline.outputs import MergedCheckpoint
from pipeline.references import FetchedCheckpoint, adapter_of, checkpoint_of, input_labels
from pipeline.registry import describe_registration
from pipeline.scores import EvalResult
from pipeline.settings import load_settings
from tasks.evaluate import evaluate_checkpoint
from tasks.fetch import fetch_checkpoint
from tasks.merge import apply_lora, merge_checkpoint
from tasks.report import publish_report
from tasks.track import finish_tracking, log_lineage, log_lineage_views, reap_dead_runs, register_model, start_tracking, track_results
from tasks.validate import validate_checkpoints


class MergeOutcome(BaseModel):
    """What a merge run produced: the folder, its fingerprint, scores per model label, where it is tracked."""

    folder: str
    fingerprint: str
    reused: bool
    run_id: str
    model_uri: str | None
    scores: dict[str, dict[str, float]]


@flow(name="merge-flow", persist_result=True)
def merge_flow(config: PipelineConfig) -> MergeOutcome:
    """Merge the checkpoints `config` names, score the merge, record it in MLflow and register it."""
    logger = get_run_logger()
    settings = load_settings()
    cache_dir, device = str(settings.cache_dir), config.device if config.device != "auto" else settings.device
    merge = config.merge_config()
    reap_dead_runs(config.experiment)  # runs a killed process left RUNNING: KILLED, their flow runs Crashed
    run_id = start_tracking(config.experiment, config.name or config.register_as or merge.method_name, tracked_params(config), prefect_tags("merge-flow"))
    logger.info("tracking in MLflow run %s", run_id)
    status = "FAILED"
    try:
        fetched = fetch_checkpoint.map(config.references(), cache_dir=unmapped(cache_dir)).result()
        inputs = {checkpoint.ref: checkpoint for checkpoint in fetched}
        checked = validate_checkpoints(config, inputs)
        logger.info("inputs agree: %d tensors (%s parameters) to merge", checked.tensors_merged, f"{checked.parameters_merged:,}")

        merged = merge_checkpoint(config, inputs, cache_dir, device)

        scores: dict[str, EvalResult] = {}
        if config.evaluation is not None:
            for label, checkpoint in _to_evaluate(config, inputs, merged, cache_dir, device):
                scores[label] = evaluate_checkpoint(label, checkpoint.folder, checkpoint.fingerprint, config.evaluation, cache_dir, device)
                logger.info("%s: %s", label, ", ".join(f"{t} {s.value:.3f}" for t, s in scores[label].scores.items()))
        table = {label: {task: s.value for task, s in result.scores.items()} for label, result in scores.items()}

        track_results(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), table, {"pcbmerge.method": merge.method_name})
        lineage = lineage_node(config, inputs, merged, run_id, flow_run.get_id())
        registered = register_model(run_id, config.experiment, merged.folder, config.register_as, lineage) if config.register_as else None
        if registered is None:
            log_lineage(run_id, lineage)
        else:
            logger.info(describe_registration(registered))
        shown = {**lineage, "model": registered["uri"] if registered else merged.folder}
        log_lineage_views(run_id, shown)
        publish_report(
            f"merge: {merge.method_name}", run_id, registered["uri"] if registered else None, merged.folder, table, shown, _registration_note(registered)
        )
        status = "FINISHED"
    finally:
        finish_tracking(run_id, status)
    return MergeOutcome(
        folder=merged.folder,
        fingerprint=merged.fingerprint,
        reused=merged.reused,
        run_id=run_id,
        model_uri=registered["uri"] if registered else None,
        scores=table,
    )


def _registration_note(registered: dict[str, str] | None) -> str:
    """One sentence for the run's page: which version it registered, or which one it matched by content."""
    return _sentence(describe_registration(registered)) if registered else "Not registered (no `register_as`)."


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _to_evaluate(config: PipelineConfig, inputs: dict[str, FetchedCheckpoint], merged: MergedCheckpoint, cache_dir: str, device: str):
    """(label, checkpoint) pairs: the base and each model when baselines are asked, then the merge."""
    merge = config.merge_config()
    pairs = []
    if config.evaluation.baselines:
        pairs.append(("base", baseline_checkpoint(merge.base_model, inputs, cache_dir, device)))
        pairs += [(label, baseline_checkpoint(ref, inputs, cache_dir, device)) for label, ref in input_labels(merge.models, inputs, {"base", "merged"})]
    pairs.append(("merged", merged))
    return pairs


def baseline_checkpoint(ref: str, inputs: dict[str, FetchedCheckpoint], cache_dir: str, device: str) -> FetchedCheckpoint | MergedCheckpoint:
    """What a baseline of model reference `ref` scores: the fetched model, or for `model+lora` the model
    with its adapter applied (written once into the cache), the model the merge read."""
    if adapter_of(ref, inputs) is None:
        return checkpoint_of(ref, inputs)
    return apply_lora(ref, inputs, cache_dir, device)
