"""`search_flow`: fetch → validate → components → CMA-ES rounds → final merge → final evaluation → register.

Each round asks CMA-ES for a population of λ vectors, builds and scores every candidate as its own Prefect
task on the flow's task runner (local threads by default; a Dask cluster through `prefect-dask` with
`search.dask_workers` / `search.dask_address`, applied by the CLI and the deployments: `infra/task_runners.py`), tells the fitnesses and saves the
state, so `resume=True` goes on from the last finished round. Only the final merge sees
`evaluation.split` (the test split); the rounds score the validation split.

Run it with `pcbmerge search CONFIG.yml`, or as a deployment (the `SearchPipelineConfig` parameter renders
as a form in the Prefect UI).
"""

# No `from __future__ import annotations`: a served flow is pickled by value into its run process, and
# pydantic must find the parameter and return classes themselves there, not names to look up.

import json
import time

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.run_context import prefect_tags, tracked_params
from pipeline.lineage import lineage_node
from pipeline.plots import convergence_png
from pipeline.references import checkpoint_of, reference_label
from pipeline.registry import describe_registration
from pipeline.search_config import SearchPipelineConfig
from pipeline.search_state import (
    Candidate,
    SearchState,
    ask_population,
    candidate_requests,
    describe_round,
    new_search_state,
    resume_state,
    search_key,
    stop_kind,
    tell_population,
)
from pipeline.settings import load_settings
from tasks.components import components_folder, compute_components
from tasks.evaluate import evaluate_checkpoint
from tasks.fetch import fetch_checkpoint
from tasks.merge import merge_checkpoint, merge_layer_groups
from tasks.report import publish_report
from tasks.search import evaluate_candidate, load_search_state, save_search_state
from tasks.track import (
    finish_tracking,
    log_lineage,
    log_lineage_views,
    reap_dead_runs,
    register_model,
    reopen_tracking,
    start_tracking,
    tag_model_version,
    track_results,
    track_search_round,
    track_search_summary,
)
from tasks.validate import validate_checkpoints


class EvaluationRecord(BaseModel):
    """One evaluation the flow ran, in order: `stage` is `search` (a candidate) or `final` (the merge)."""

    stage: str
    split: str
    round: int | None = None
    worker: str | None = None  # host:pid of the process that evaluated a candidate


class SearchOutcome(BaseModel):
    finished: bool  # False: paused by `stop_after_rounds`; resume to go on
    lambdas: list[float]  # best so far
    ratio: float | None
    best_fitness: float
    start_fitness: float  # the start λ's fitness (first candidate of the first round)
    evaluations: int
    rounds: int
    build_seconds: float
    eval_seconds: float
    run_id: str
    stopped: str | None = None  # why the search ended: budget | flat | converged | sigma (None: paused)
    stop_reasons: dict[str, str | None] = {}  # ratio ("None" without a ratio grid) -> the full sentence
    folder: str | None = None
    model_uri: str | None = None
    test_scores: dict[str, float] = {}
    history: list[EvaluationRecord] = []

    def summary(self) -> dict:
        """What `pcbmerge search --json` prints."""
        return {
            "lambdas": self.lambdas,
            "best_fitness": self.best_fitness,
            "evaluations": self.evaluations,
            "rounds": self.rounds,
            "stopped": self.stopped,
            "model": self.model_uri,
            "test_scores": self.test_scores,
        }


@flow(name="search-flow", persist_result=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def search_flow(config: SearchPipelineConfig, resume: bool = False, stop_after_rounds: int | None = None) -> SearchOutcome:
    """Search λ with CMA-ES on the validation split, then merge, test, track and register the best."""
    logger = get_run_logger()
    settings = load_settings()
    cache_dir, device = str(settings.cache_dir), config.device if config.device != "auto" else settings.device
    merge = config.merge_config()

    # Fetched here, not on the task runner: the search's runner may be a Dask cluster, meant for candidates.
    fetched = [fetch_checkpoint(ref, cache_dir) for ref in config.references()]
    inputs = {checkpoint.ref: checkpoint for checkpoint in fetched}
    validate_checkpoints(config, inputs)
    tokenizer_folder = checkpoint_of(merge.tokenizer_source, inputs).folder  # (a merge's own vocabulary: the components')

    arms = [(ratio, with_ratio(config, ratio)) for ratio in config.ratios()]
    saved = {ratio: load_search_state(search_key(config, ratio, components_folder(arm, inputs, cache_dir)[0])) for ratio, arm in arms} if resume else {}
    resumed_run = next((state.run_id for state in saved.values() if state is not None), None)
    reap_dead_runs(config.experiment)  # runs a killed process left RUNNING (a resumed one is reopened next)
    if resumed_run:
        run_id = resumed_run
        reopen_tracking(run_id)
        logger.info("resuming the search of MLflow run %s", run_id)
    else:
        run_id = start_tracking(
            config.experiment, config.name or config.register_as or f"{merge.method_name}-search", tracked_params(config), prefect_tags("search-flow")
        )

    status = "FAILED"
    try:
        states: list[SearchState] = []
        stored = {}  # ratio -> stored components
        paused = False
        for ratio, arm in arms:
            components = stored[ratio] = compute_components(arm, inputs, cache_dir, device)
            state = resume_state(saved[ratio], config) if saved.get(ratio) else new_search_state(config, ratio, components.key, run_id)
            while state.stop is None and not paused:
                if stop_after_rounds is not None and _rounds(states) + len(state.rounds) >= stop_after_rounds:
                    paused = True
                    break
                started = time.perf_counter()
                es, population = ask_population(state)
                requests = candidate_requests(config, components.folder, components.key, tokenizer_folder, population, cache_dir, device)
                labels = [f"r{len(state.rounds)}.{i}" + ("" if ratio is None else f" ratio {ratio}") for i in range(len(requests))]
                scores = [future.result() for future in evaluate_candidate.map(requests, labels)]
                state = tell_population(state, es, population, scores, time.perf_counter() - started)
                save_search_state(state)
                track_search_round(run_id, state.rounds[-1].model_dump(mode="json"), state.cma_state, _history(state), _artifact_path(ratio))
                logger.info(describe_round(state.rounds[-1], state))
            states.append(state)
            if paused:
                break

        best = max((s.best for s in states if s.best is not None), key=lambda c: c.fitness)
        outcome = _outcome(states, best, run_id, finished=not paused)
        if paused:
            logger.info("paused after %d rounds; resume with `pcbmerge search CONFIG --resume`", outcome.rounds)
            status = "KILLED"
            return outcome

        if config.search.layer_groups == 1:
            final = with_lambdas(with_ratio(config, best.ratio), best.lambdas)
            merged = merge_checkpoint(final, inputs, cache_dir, device)
        else:  # λ per layer group: built from the stored components (lineage records the whole genome)
            final = with_ratio(config, best.ratio)
            chosen = stored[best.ratio]
            merged = merge_layer_groups(final, config.search.layer_groups, chosen.folder, chosen.key, best.lambdas, tokenizer_folder, cache_dir, device)
        tested = evaluate_checkpoint("merged", merged.folder, merged.fingerprint, config.evaluation, cache_dir, device)
        test_scores = {task: score.value for task, score in tested.scores.items()}
        logger.info("final merge on the %s split: %s", config.evaluation.split, ", ".join(f"{t} {v:.3f}" for t, v in test_scores.items()))

        track_results(run_id, yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False), {"merged": test_scores}, {"pcbmerge.method": merge.method_name})
        rounds = [r.model_dump(mode="json") for s in states for r in s.rounds]
        summary = {
            "lambdas": best.lambdas,
            "ratio": best.ratio,
            "best_fitness": best.fitness,
            "evaluations": outcome.evaluations,
            "rounds": outcome.rounds,
            "stopped": {str(s.ratio): s.stop for s in states},
        }
        track_search_summary(run_id, convergence_png(rounds, [reference_label(ref, inputs) for ref in merge.models]), summary, _search_tags(config, outcome))
        lineage = lineage_node(final, inputs, merged, run_id, flow_run.get_id())
        lineage["search"] = {
            "settings": config.search.model_dump(mode="json"),
            "evaluations": outcome.evaluations,
            "layer_groups": config.search.layer_groups,
            "rounds": outcome.rounds,
            "best_fitness": best.fitness,
            "ratio": best.ratio,
        }
        registered = register_model(run_id, config.experiment, merged.folder, config.register_as, lineage) if config.register_as else None
        if registered is None:
            log_lineage(run_id, lineage)
        else:
            logger.info(describe_registration(registered))
            if registered["matched"] != "true":  # a matched version keeps the tags of the search that made it
                tag_model_version(registered["name"], registered["version"], _search_tags(config, outcome))
        shown = {**lineage, "model": registered["uri"] if registered else merged.folder}
        log_lineage_views(run_id, shown)
        note = f"{outcome.evaluations} candidates in {outcome.rounds} rounds; best validation fitness {best.fitness:.4f}."
        if registered is not None:
            note += " " + describe_registration(registered) + "."
        publish_report(f"search: {merge.method_name}", run_id, registered["uri"] if registered else None, merged.folder, {"merged": test_scores}, shown, note)
        status = "FINISHED"
    finally:
        finish_tracking(run_id, status)
    return outcome.model_copy(
        update={
            "folder": merged.folder,
            "model_uri": registered["uri"] if registered else None,
            "test_scores": test_scores,
            "history": [*outcome.history, EvaluationRecord(stage="final", split=config.evaluation.split)],
        }
    )


def with_ratio(config: SearchPipelineConfig, ratio: float | None) -> SearchPipelineConfig:
    """The config with PCB's ratio set (unchanged for `None`)."""
    if ratio is None:
        return config
    return config.model_copy(update={"parameters": {**config.parameters, "ratio": ratio}})


def with_lambdas(config: SearchPipelineConfig, lambdas: list[float]) -> SearchPipelineConfig:
    """The config with each model's `lambda` set: the merge the search chose."""
    models = [m.model_copy(update={"parameters": {**m.parameters, "lambda": float(x)}}) for m, x in zip(config.models, lambdas)]
    return config.model_copy(update={"models": models})


def _rounds(states: list[SearchState]) -> int:
    return sum(len(s.rounds) for s in states)


def _outcome(states: list[SearchState], best: Candidate, run_id: str, finished: bool) -> SearchOutcome:
    rounds = [r for s in states for r in s.rounds]
    first = rounds[0].candidates[0]
    holder = next((s for s in states if s.best is not None and s.best.ratio == best.ratio), states[-1])
    return SearchOutcome(
        stopped=stop_kind(holder.stop) if finished else None,
        stop_reasons={str(s.ratio): s.stop for s in states},
        finished=finished,
        lambdas=best.lambdas,
        ratio=best.ratio,
        best_fitness=best.fitness,
        start_fitness=first.fitness,
        evaluations=sum(len(r.candidates) for r in rounds),
        rounds=len(rounds),
        build_seconds=sum(r.build_seconds for r in rounds),
        eval_seconds=sum(r.eval_seconds for r in rounds),
        run_id=run_id,
        history=[EvaluationRecord(stage="search", split=c.split, round=r.round, worker=c.worker) for r in rounds for c in r.candidates],
    )


def _history(state: SearchState) -> dict:
    return {
        "key": state.key,
        "ratio": state.ratio,
        "stop": state.stop,
        "best": state.best.model_dump() if state.best else None,
        "evaluations": [c.model_dump() for c in state.candidates()],
    }


def _artifact_path(ratio: float | None) -> str:
    return "search" if ratio is None else f"search/ratio-{ratio}"


def _search_tags(config: SearchPipelineConfig, outcome: SearchOutcome) -> dict[str, str]:
    return {
        "pcbmerge.search.settings": json.dumps(config.search.model_dump(mode="json"), sort_keys=True),
        "pcbmerge.search.evaluations": str(outcome.evaluations),
        "pcbmerge.search.rounds": str(outcome.rounds),
        "pcbmerge.search.best_fitness": repr(outcome.best_fitness),
        "pcbmerge.search.stopped": str(outcome.stopped),
    }
