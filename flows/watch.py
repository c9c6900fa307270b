"""`watch_flow`: merge again when the checkpoints in a source change, and only then.

    discover the source's checkpoints → read what the last merge used (MLflow lineage of the newest version
    of `register_as`) → same content and parameters? done : merge_flow (or search_flow) on the new set

"Same" is decided by content — each checkpoint's fingerprint (or Hub commit, registry version), the base's,
the method and its parameters — never by the paths the checkpoints sit under: a merge made from the UI out
of `zoo/experts/a` and a watch of `incoming/` holding a copy of it are the same merge.

The last merge's inputs come from the registry, not from a side file, so a watch is idempotent however
often it runs and wherever it runs: two runs on the same set make one merge. A failed merge registers
nothing, so the next run tries again. Deploy it with an interval or cron schedule (`pcbmerge watch
CONFIG.yml --source DIR --every 1h`, `pcbmerge serve`, or `infra/prefect.yaml`); the deployment allows one
run at a time.
"""

# No `from __future__ import annotations`: a served flow is pickled by value into its run process, and
# pydantic must find the parameter and return classes themselves there, not names to look up.

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from pcbcore.config import ModelEntry
from pcbcore.errors import MergeInputError
from pipeline.config import PipelineConfig
from pipeline.discovery import DiscoveredCheckpoint, lineage_identity, merge_identity, reference_identity, same_checkpoint, source_kind
from pipeline.registry import last_merge_lineage
from pipeline.report import watch_markdown, watch_title
from pipeline.search_config import SearchPipelineConfig
from pipeline.settings import load_settings
from pipeline.watch_config import WatchConfig
from tasks.discover import discover_checkpoints
from tasks.report import label_flow_run


class WatchOutcome(BaseModel):
    merged: bool
    model: str | None = Field(description="models:/NAME/VERSION registered by this run, or None")
    inputs: list[str] = Field(description="the source's checkpoints (refs) that the merge used or would use")
    reason: str


@flow(name="watch-flow", persist_result=True)
def watch_flow(config: WatchConfig) -> WatchOutcome:
    """List the source, compare with the last merge's lineage, merge only when the set changed."""
    logger = get_run_logger()
    pipeline = config.pipeline
    name = pipeline.register_as
    check_watch_config(config)

    found = discover_checkpoints(config.source, str(load_settings().cache_dir))
    if pipeline.base_model:
        found = [c for c in found if c.ref != pipeline.base_model and not same_checkpoint(c.ref, pipeline.base_model)]
    refs = [c.ref for c in found]
    logger.info("%s holds %d checkpoint(s): %s", config.source, len(found), ", ".join(refs) or "none")
    if len(found) < config.min_models:
        reason = f"{len(found)} checkpoint(s), fewer than min_models={config.min_models}"
        label_flow_run(watch_title(False, len(refs), None), ["no-change"], watch_markdown(config.source, refs, False, None, reason))
        return WatchOutcome(merged=False, model=None, inputs=refs, reason=reason)

    last = last_merge_lineage(name)
    merge_config = pipeline_for(pipeline, found)
    searched = config.search is not None
    if last is not None and lineage_identity(last, searched) == wanted_identity(merge_config, found, searched):
        logger.info("nothing new since %s (same content and parameters); no merge", last["model"])
        reason = f"same checkpoints as {last['model']}"
        label_flow_run(watch_title(False, len(refs), None), ["no-change"], watch_markdown(config.source, refs, False, last["model"], reason))
        return WatchOutcome(merged=False, model=None, inputs=refs, reason=reason)

    logger.info("the set changed since %s; merging %d checkpoints", last["model"] if last else "the first merge", len(found))
    if config.search is not None:
        from flows.search import search_flow

        search_config = SearchPipelineConfig(**{k: getattr(merge_config, k) for k in PipelineConfig.model_fields}, search=config.search)
        model_uri = search_flow(search_config).model_uri
    else:
        from flows.merge import merge_flow

        model_uri = merge_flow(merge_config).model_uri
    reason = "first merge" if last is None else f"changed since {last['model']}"
    label_flow_run(watch_title(True, len(found), model_uri), ["merged"], watch_markdown(config.source, refs, True, model_uri, reason))
    return WatchOutcome(merged=True, model=model_uri, inputs=refs, reason=reason)


def check_watch_config(config: WatchConfig) -> None:
    """Bad input before any work: no registry name to compare with, or a source that is its own output."""
    name = config.pipeline.register_as
    if not name:
        raise MergeInputError("a watch needs 'register_as' in the pipeline config: the last merge's inputs are read from that registered model")
    source_kind(config.source)
    if config.source.rstrip("/") == f"models:/{name}":
        raise MergeInputError(f"watch source '{config.source}' is the model the watch registers into; it would merge its own output forever")


def wanted_identity(merge_config: PipelineConfig, found: list[DiscoveredCheckpoint], searched: bool) -> tuple:
    """What a merge of the found checkpoints would be made of, by content (`pipeline.discovery.merge_identity`)."""
    merge = merge_config.merge_config()
    identities = {c.ref: c.identity for c in found}
    models = [(identities[ref], params.model_dump(by_alias=True)) for ref, params in zip(merge.models, merge.model_params)]
    base = reference_identity(merge.base_model, load_settings().cache_dir)
    return merge_identity(merge.method_name, merge.params.model_dump(by_alias=True), base, models, searched)


def pipeline_for(pipeline: PipelineConfig, found: list[DiscoveredCheckpoint]) -> PipelineConfig:
    """The pipeline config with `models` = the found checkpoints; per-model parameters kept where the config
    lists the same ref (or a folder of the same name)."""
    given = {entry.model: entry.parameters for entry in pipeline.models}
    given_by_name = {entry.model.rstrip("/").rsplit("/", 1)[-1]: entry.parameters for entry in pipeline.models}

    def params(ref: str) -> dict:
        return given.get(ref) or given_by_name.get(ref.rstrip("/").rsplit("/", 1)[-1], {})

    models = [ModelEntry(model=c.ref, parameters=params(c.ref)) for c in found]
    return PipelineConfig.model_validate({**pipeline.model_dump(), "models": [m.model_dump() for m in models]})
