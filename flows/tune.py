"""`tune_flow`: the paper's tuning protocol for every method, with one budget each.

fetch → validate → for each method: grid (stage 1) → CMA-ES on per-model λ_i (stage 2) → re-score the top
candidates on more validation data (stage 3) → merge the choice → test → then the leaderboard, the winner
registered with its lineage.

Every candidate is the search's Prefect task (`evaluate_candidate`): built in memory from stored components
and scored on the validation split; the tuner's progress and each CMA-ES round are saved, so `resume=True`
goes on after a kill. Only each method's choice (and, with `tune.report_defaults`, its default setting, for
the report only) sees `evaluation.split`.

Run it with `pcbmerge tune CONFIG.yml`, or as a deployment (the `TunePipelineConfig` parameter renders as a
form in the Prefect UI).
"""

# No `from __future__ import annotations`: a served flow is pickled by value into its run process, and
# pydantic must find the parameter and return classes themselves there, not names to look up.

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.merge import baseline_checkpoint
from flows.run_context import prefect_tags, tracked_params
from pipeline import tuning
from pipeline.lineage import lineage_node
from pipeline.references import checkpoint_of, input_labels
from pipeline.registry import describe_registration
from pipeline.search_state import (
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
from pipeline.tune_config import TuneMethod, TunePipelineConfig
from pipeline.tuning import Finalist, LeaderboardRow, MethodProgress, TuneEvaluation, TuneState
from tasks.components import compute_components
from tasks.evaluate import evaluate_checkpoint
from tasks.fetch import fetch_checkpoint
from tasks.merge import merge_checkpoint
from tasks.search import evaluate_candidate, load_search_state, save_search_state
from tasks.track import finish_tracking, log_lineage, reap_dead_runs, register_model, reopen_tracking, start_tracking, track_results
from tasks.tune import load_tune_state, publish_leaderboard, save_tune_state, track_tune_candidates
from tasks.validate import validate_checkpoints


class TuneOutcome(BaseModel):
    finished: bool  # False: paused by `stop_after_rounds`; resume to go on
    leaderboard: list[LeaderboardRow] = []
    winner: str | None = None
    baselines: dict[str, dict[str, float]] = {}  # with evaluation.baselines: the base and each input on evaluation.split
    run_id: str
    folder: str | None = None  # the winner's merged folder
    model_uri: str | None = None
    rounds: int = 0  # stages and CMA-ES rounds run or resumed, all methods together
    history: list[TuneEvaluation] = []

    def summary(self) -> dict:
        """What `pcbmerge tune --json` prints."""
        return {
            "finished": self.finished,
            "winner": self.winner,
            "model": self.model_uri,
            "leaderboard": [row.model_dump(mode="json") for row in self.leaderboard],
        }


class _Run(BaseModel):
    """What every stage needs: where things go, and the state so far."""

    cache_dir: str
    device: str
    tokenizer_folder: str
    run_id: str
    state: TuneState
    rounds: int = 0
    stop_after_rounds: int | None = None
    resume: bool = False
    history: list[TuneEvaluation] = []

    def paused(self) -> bool:
        return self.stop_after_rounds is not None and self.rounds >= self.stop_after_rounds


@flow(name="tune-flow", persist_result=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def tune_flow(config: TunePipelineConfig, resume: bool = False, stop_after_rounds: int | None = None) -> TuneOutcome:
    """Grid, CMA-ES and re-scoring per method on validation data; each choice tested; the winner registered."""
    logger = get_run_logger()
    settings = load_settings()
    cache_dir, device = str(settings.cache_dir), config.device if config.device != "auto" else settings.device

    fetched = [fetch_checkpoint(ref, cache_dir) for ref in config.references()]
    inputs = {checkpoint.ref: checkpoint for checkpoint in fetched}
    validate_checkpoints(config, inputs)
    key = tuning.tune_key(config, {ref: c.fingerprint for ref, c in inputs.items()})
    saved = load_tune_state(key) if resume else None
    reap_dead_runs(config.experiment)  # runs a killed process left RUNNING (a resumed one is reopened next)
    if saved is not None:
        run_id = saved.run_id
        reopen_tracking(run_id)
        logger.info("resuming the tuning of MLflow run %s", run_id)
    else:
        run_id = start_tracking(config.experiment, config.name or config.register_as or "tune", tracked_params(config), prefect_tags("tune-flow"))
    run = _Run(
        cache_dir=cache_dir,
        device=device,
        tokenizer_folder=checkpoint_of(config.merge_config().tokenizer_source, inputs).folder,
        run_id=run_id,
        state=saved or TuneState(key=key, run_id=run_id),
        stop_after_rounds=stop_after_rounds,
        resume=resume,
    )

    status = "FAILED"
    try:
        rows: list[LeaderboardRow] = []
        for method in config.tune.methods:
            row = tune_method(config, method, inputs, run)
            if row is None:  # paused
                logger.info("paused after %d rounds; resume with `pcbmerge tune CONFIG --resume`", run.rounds)
                status = "KILLED"
                return TuneOutcome(finished=False, leaderboard=rows, run_id=run_id, rounds=run.rounds, history=run.history)
            rows.append(row)

        rows = tuning.crown(rows)
        winner = next(r for r in rows if r.winner)
        baselines = {}
        if config.evaluation.baselines:  # for the report: what the merges are measured against
            for label, ref in _baseline_labels(config, inputs):
                checkpoint = baseline_checkpoint(ref, inputs, cache_dir, device)  # a model+lora: the adapter applied
                scored = evaluate_checkpoint(label, checkpoint.folder, checkpoint.fingerprint, config.evaluation, cache_dir, device)
                baselines[label] = {task: score.value for task, score in scored.scores.items()}
                run.history.append(TuneEvaluation(stage="baseline", split=config.evaluation.split, method=label))
        table = publish_leaderboard(run_id, rows, config.evaluation.split)
        logger.info("leaderboard (%s split):\n%s", config.evaluation.split, table)

        chosen = next(m for m in config.tune.methods if m.name() == winner.method)
        final = tuning.method_config(config, chosen, {**winner.parameters}, winner.lambdas)
        if config.output:  # the winner also goes where the config asks
            final = final.model_copy(update={"output": config.output, "overwrite": config.overwrite})
        merged = merge_checkpoint(final, inputs, cache_dir, device)
        track_results(
            run_id,
            yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False),
            {**baselines, **{tuning.slug(row.method): row.test_scores for row in rows}},  # MLflow metric names: no parentheses
            {"pcbmerge.method": final.merge_method, "pcbmerge.tune.winner": winner.method},
        )
        lineage = lineage_node(final, inputs, merged, run_id, flow_run.get_id())
        lineage["tune"] = {
            "method": winner.method,
            "settings": config.tune.model_dump(mode="json"),
            "validation": winner.validation,
            "evaluations": winner.evaluations,
            "leaderboard": [r.model_dump(mode="json") for r in rows],
        }
        registered = register_model(run_id, config.experiment, merged.folder, config.register_as, lineage) if config.register_as else None
        if registered is None:
            log_lineage(run_id, lineage)
        else:
            logger.info(describe_registration(registered))
        status = "FINISHED"
    finally:
        finish_tracking(run_id, status)
    return TuneOutcome(
        finished=True,
        leaderboard=rows,
        winner=winner.method,
        baselines=baselines,
        run_id=run_id,
        folder=merged.folder,
        model_uri=registered["uri"] if registered else None,
        rounds=run.rounds,
        history=run.history,
    )


def tune_method(config: TunePipelineConfig, method: TuneMethod, inputs: dict, run: _Run) -> LeaderboardRow | None:
    """The three stages for one method, then its choice merged and tested (None: paused on the way)."""
    logger = get_run_logger()
    label = method.name()
    progress = run.state.methods.get(label) or MethodProgress(label=label)

    # Stage 1: the grid (one components folder per setting of the method's own keys; λ only weighs them).
    if progress.grid is None:
        if run.paused():
            return None
        points = method.points()
        refs = {}
        for point in points:
            setting = tuning.components_setting(point)
            name = repr(sorted(setting.items()))
            if name not in refs:
                stored = compute_components(tuning.method_config(config, method, point), inputs, run.cache_dir, run.device)
                refs[name] = (stored.key, stored.folder)
        placed = [refs[repr(sorted(tuning.components_setting(p).items()))] for p in points]
        n = len(config.models)
        requests = [
            tuning.candidate_request(config, folder, key, run.tokenizer_folder, [p["lambda"]] * n, tuning.search_limit(config), run.cache_dir, run.device)
            for p, (key, folder) in zip(points, placed)
        ]
        scores = [f.result() for f in evaluate_candidate.map(requests, [f"{label} grid {i}" for i in range(len(requests))])]
        progress = progress.model_copy(update={"grid": tuning.grid_scores(points, placed, scores)})
        _save(run, progress)
        track_tune_candidates(run.run_id, label, "grid", 0, [{**s.model_dump(), "setting": p, "limit": r.limit} for p, s, r in zip(points, scores, requests)])
        run.history += [TuneEvaluation(stage="grid", split="validation", method=label)] * len(scores)
        run.rounds += 1
    best = tuning.best_grid_point(method, progress.grid)
    logger.info(tuning.describe_grid(label, progress.grid, best))

    # Stage 2: CMA-ES on per-model λ_i from the best grid point, with the budget the grid left.
    search_config = tuning.stage_two_config(config, method, best)
    search: SearchState | None = None
    if search_config is not None:
        key = search_key(search_config, None, best.components_key)
        saved = load_search_state(key) if run.resume else None
        search = resume_state(saved, search_config) if saved else new_search_state(search_config, None, best.components_key, run.run_id)
        while search.stop is None:
            if run.paused():
                return None
            es, population = ask_population(search)
            requests = candidate_requests(
                search_config, best.components_folder, best.components_key, run.tokenizer_folder, population, run.cache_dir, run.device
            )
            labels = [f"{label} r{len(search.rounds)}.{i}" for i in range(len(requests))]
            scores = [f.result() for f in evaluate_candidate.map(requests, labels)]
            search = tell_population(search, es, population, scores, sum(s.build_seconds + s.eval_seconds for s in scores))
            save_search_state(search)
            track_tune_candidates(
                run.run_id, label, "search", search.rounds[-1].round, [{**s.model_dump(), "limit": r.limit} for s, r in zip(scores, requests)]
            )
            run.history += [TuneEvaluation(stage="search", split="validation", method=label)] * len(scores)
            run.rounds += 1
            logger.info("%s: %s", label, describe_round(search.rounds[-1], search))
        progress = progress.model_copy(update={"search_evaluations": search.evaluations, "stopped": stop_kind(search.stop)})
    else:
        progress = progress.model_copy(update={"search_evaluations": 0, "stopped": "no budget"})

    # Stage 3: the top candidates re-scored on more validation data; the best of those is the choice.
    if progress.finalists is None:
        if run.paused():
            return None
        top = tuning.finalists(method, progress.grid, search, best, config.tune.top_k)
        requests = [
            tuning.candidate_request(
                config, f.components_folder, f.components_key, run.tokenizer_folder, f.lambdas, config.tune.rescore_limit, run.cache_dir, run.device
            )
            for f in top
        ]
        scores = [f.result() for f in evaluate_candidate.map(requests, [f"{label} rescore {i}" for i in range(len(requests))])]
        rescored = [f.model_copy(update={"validation": s}) for f, s in zip(top, scores)]
        progress = progress.model_copy(update={"finalists": rescored})
        _save(run, progress)
        track_tune_candidates(
            run.run_id, label, "rescore", 0, [{**s.model_dump(), "setting": f.setting, "limit": r.limit} for f, s, r in zip(top, scores, requests)]
        )
        run.history += [TuneEvaluation(stage="rescore", split="validation", method=label)] * len(scores)
        run.rounds += 1
    choice: Finalist = tuning.choose(progress.finalists)
    logger.info(
        "%s: chose %s (%s): validation %.4f, search slice %.4f",
        label,
        tuning.format_setting(choice.setting, choice.lambdas),
        choice.stage,
        choice.validation.fitness,
        choice.search_fitness,
    )

    # The choice (and, for the report only, the default setting) on the test split.
    evaluation = config.evaluation
    merged = merge_checkpoint(tuning.method_config(config, method, choice.setting, choice.lambdas), inputs, run.cache_dir, run.device)
    tested = evaluate_checkpoint(f"{label} tuned", merged.folder, merged.fingerprint, evaluation, run.cache_dir, run.device)
    run.history.append(TuneEvaluation(stage="test", split=evaluation.split, method=label))
    mean, stderr, values = tuning.test_summary(tested.scores)
    default = method.default_setting()
    default_mean = default_values = None
    if config.tune.report_defaults:
        plain = merge_checkpoint(tuning.method_config(config, method, default), inputs, run.cache_dir, run.device)
        default_mean, _, default_values = tuning.test_summary(
            evaluate_checkpoint(f"{label} default", plain.folder, plain.fingerprint, evaluation, run.cache_dir, run.device).scores
        )
        run.history.append(TuneEvaluation(stage="default", split=evaluation.split, method=label))
    logger.info("%s: %s split mean %.4f%s", label, evaluation.split, mean, "" if default_mean is None else f" (default setting {default_mean:.4f})")
    return LeaderboardRow(
        method=label,
        merge_method=method.method,
        parameters=choice.setting,
        lambdas=choice.lambdas,
        validation=choice.validation.fitness,
        search_fitness=choice.search_fitness,
        test=mean,
        test_stderr=stderr,
        test_scores=values,
        default_setting=default,
        default_test=default_mean,
        default_test_scores=default_values,
        evaluations=len(progress.grid) + progress.search_evaluations,
        grid_points=len(progress.grid),
        grid_best=best.setting,
        grid_fitness=best.score.fitness,
        chosen_from=choice.stage,
        rescored=len(progress.finalists),
        stopped=progress.stopped,
        model=merged.folder,
    )


def _baseline_labels(config: TunePipelineConfig, inputs: dict) -> list[tuple[str, str]]:
    """(label, reference) of the base and each input model, labels made unique."""
    merge = config.merge_config()
    return [("base", merge.base_model), *input_labels(merge.models, inputs, {"base"})]


def _save(run: _Run, progress: MethodProgress) -> None:
    run.state = run.state.model_copy(update={"methods": {**run.state.methods, progress.label: progress}})
    save_tune_state(run.state)
