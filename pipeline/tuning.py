"""The tuner's plain logic, with no Prefect in sight: per-method configs and candidate requests, the choice
at each stage, the saved state, the leaderboard and its MLflow records.

For each method (`pipeline.tune_config`), with one budget of evaluations on the search slice:

    stage 1  grid       every point of the method's grid (its own hyper-parameters × one uniform λ)
    stage 2  CMA-ES     per-model λ_i from the best grid point (`pipeline.search_state`), the budget left
    stage 3  re-score   the top candidates of stages 1–2 on more validation data; the best is the choice

A grid point's non-λ keys (density, ratio, ...) decide its components C_i, stored once per setting
(`tasks.components`); λ only weighs them, so every point is a cheap candidate. Only each method's choice
is merged to disk and scored on the test split; the overall winner is the choice with the best stage-3
validation score.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

from pipeline.cache_keys import digest, task_files
from pipeline.config import PipelineConfig
from pipeline.evaluation import LM_EVAL_VERSION
from pipeline.search_config import SearchPipelineConfig, SearchSettings
from pipeline.search_state import CandidateRequest, CandidateScore, SearchState, format_lambdas
from pipeline.tables import render_markdown, render_text
from pipeline.tune_config import LAMBDA, TuneMethod, TunePipelineConfig

# ---------------------------------------------------------------- records


class TuneEvaluation(BaseModel):
    """One evaluation the tuner ran, in order: which stage, which split, for which method."""

    stage: str  # grid | search | rescore | test | default
    split: str
    method: str


class GridScore(BaseModel):
    """A grid point scored on the search slice."""

    setting: dict[str, float]  # the grid's keys, λ included
    components_key: str
    components_folder: str
    score: CandidateScore


class Finalist(BaseModel):
    """A top candidate of stages 1–2 and its stage-3 score."""

    stage: str  # grid | search
    setting: dict[str, float]  # the components' keys (no λ)
    lambdas: list[float]
    components_key: str
    components_folder: str
    search_fitness: float
    validation: CandidateScore | None = None


class MethodProgress(BaseModel):
    label: str
    grid: list[GridScore] | None = None  # None until stage 1 is done
    finalists: list[Finalist] | None = None  # None until stage 3 is done
    search_evaluations: int = 0
    stopped: str | None = None  # why stage 2 ended (`pipeline.search_state.stop_kind`'s words, or "no budget")


class TuneState(BaseModel):
    """Saved after every stage and CMA-ES round (the CMA-ES state itself is the search's own saved state)."""

    key: str
    run_id: str
    methods: dict[str, MethodProgress] = {}


class LeaderboardRow(BaseModel):
    method: str  # the label
    merge_method: str
    parameters: dict[str, Any]  # the chosen setting: fixed parameters and tuned keys (λ apart)
    lambdas: list[float]  # the chosen λ_i
    validation: float  # stage-3 fitness (all the re-scoring data)
    search_fitness: float  # its fitness on the search slice
    test: float  # mean over tasks, on evaluation.split
    test_stderr: float | None  # standard error of that mean (from the tasks' stderrs)
    test_scores: dict[str, float]
    default_setting: dict[str, float]
    default_test: float | None = None  # the default setting on the test split (reported only, with report_defaults)
    default_test_scores: dict[str, float] | None = None
    evaluations: int  # on the search slice: grid + CMA-ES
    grid_points: int
    grid_best: dict[str, float]  # stage 1's best point (λ included) and its fitness
    grid_fitness: float
    chosen_from: str  # grid | search: the stage the choice came from
    rescored: int
    stopped: str | None  # why stage 2 ended: budget | flat | converged | sigma | no budget
    winner: bool = False
    model: str | None = None  # the merged folder


# ---------------------------------------------------------------- configs and requests


def slug(label: str) -> str:
    """`pcb (paper)` → `pcb-paper`: a label as an MLflow metric prefix or an artifact folder."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def components_setting(setting: dict[str, float]) -> dict[str, float]:
    """The keys that decide the components (every key but λ)."""
    return {k: v for k, v in setting.items() if k != LAMBDA}


def method_config(config: TunePipelineConfig, method: TuneMethod, setting: dict[str, float], lambdas: list[float] | None = None) -> PipelineConfig:
    """The pipeline config of one setting of one method: fixed parameters, the setting's other keys at the
    top level, λ per model (`lambdas`, else the setting's uniform λ). Merges go to content-keyed folders."""
    n = len(config.models)
    values = lambdas if lambdas is not None else [setting.get(LAMBDA, 1.0)] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} coefficients for {n} models")
    models = [m.model_copy(update={"parameters": {**m.parameters, LAMBDA: float(x)}}) for m, x in zip(config.models, values)]
    fields = {name: getattr(config, name) for name in PipelineConfig.model_fields}
    fields.update(
        merge_method=method.method,
        parameters={**method.parameters, **components_setting(setting)},
        models=models,
        output=None,
        name=f"{config.name or 'tune'}: {method.name()}",
    )
    return PipelineConfig.model_validate(fields)


def candidate_request(
    config: TunePipelineConfig,
    components_folder: str,
    components_key: str,
    tokenizer_folder: str,
    lambdas: list[float],
    limit: int | None,
    cache_dir: str,
    device: str,
) -> CandidateRequest:
    """One candidate on the validation split, `limit` examples per task."""
    evaluation = config.evaluation
    return CandidateRequest(
        components_folder=components_folder,
        components_key=components_key,
        tokenizer_folder=tokenizer_folder,
        lambdas=[float(x) for x in lambdas],
        tasks=list(evaluation.tasks),
        include_path=evaluation.include_path,
        split="validation",
        limit=limit,
        batch_size=evaluation.batch_size,
        weights=config.tune.weights,
        device=device,
        cache_dir=cache_dir,
        dtype=evaluation.dtype,
        apply_chat_template=evaluation.apply_chat_template,
        fewshot_as_multiturn=evaluation.fewshot_as_multiturn,
    )


def search_limit(config: TunePipelineConfig) -> int | None:
    """Examples per task of stages 1–2."""
    return config.tune.limit or config.evaluation.limit


def tune_key(config: TunePipelineConfig, fingerprints: dict[str, str]) -> str:
    """Names a tuning run: its inputs (by content), its methods and budget, and its fitness."""
    evaluation = config.evaluation
    settings = config.tune.model_dump(mode="json", exclude={"workers", "report_defaults"})
    fitness = [evaluation.tasks, task_files(evaluation.include_path), evaluation.model_dump(include={"dtype", "apply_chat_template", "fewshot_as_multiturn"})]
    return digest([sorted(fingerprints.items()), [m.model_dump() for m in config.models], settings, fitness, LM_EVAL_VERSION])


def grid_scores(points: list[dict[str, float]], refs: list[tuple[str, str]], scores: list[CandidateScore]) -> list[GridScore]:
    """Stage 1's records: each point with its components (key, folder) and its score."""
    return [GridScore(setting=p, components_key=k, components_folder=f, score=s) for p, (k, f), s in zip(points, refs, scores)]


def distance_to_default(method: TuneMethod, setting: dict[str, float], lambdas: list[float]) -> float:
    """How far a candidate is from the method's default setting: grid steps on each components key, plus
    the mean relative change of λ. Ties in fitness go to the nearest (the default is chosen for a reason)."""
    grid, default = method.full_grid(), method.default_setting()
    steps = sum(abs(grid[k].index(v) - grid[k].index(default[k])) for k, v in components_setting(setting).items() if k in default and v in grid[k])
    start = default[LAMBDA]
    return steps + sum(abs(x - start) for x in lambdas) / (len(lambdas) * start)


def best_grid_point(method: TuneMethod, grid: list[GridScore]) -> GridScore:
    """Stage 1's best point; ties go to the point nearest the default setting."""
    return max(grid, key=lambda g: (g.score.fitness, -distance_to_default(method, g.setting, g.score.lambdas)))


def stage_two_config(config: TunePipelineConfig, method: TuneMethod, best: GridScore) -> SearchPipelineConfig | None:
    """CMA-ES over per-model λ_i from the best grid point, with the budget the grid left (None: none left)."""
    tune = config.tune
    left = tune.budget - len(method.points())
    if left < 1:
        return None
    start = best.setting[LAMBDA]
    search = SearchSettings(
        budget=left,
        popsize=tune.popsize,
        bounds=(tune.bounds[0] * start, tune.bounds[1] * start),
        sigma0=tune.sigma0 * start,
        start=start,
        seed=tune.seed,
        limit=search_limit(config),
        weights=tune.weights,
        workers=tune.workers,
    )
    chosen = method_config(config, method, best.setting)
    return SearchPipelineConfig(**{name: getattr(chosen, name) for name in PipelineConfig.model_fields}, search=search)


def finalists(method: TuneMethod, grid: list[GridScore], search: SearchState | None, best: GridScore, top_k: int) -> list[Finalist]:
    """The `top_k` distinct candidates of stages 1–2 by search fitness (ties: nearest the default)."""
    pool = [
        Finalist(stage="grid", setting=components_setting(g.setting), lambdas=g.score.lambdas, **_components(g), search_fitness=g.score.fitness) for g in grid
    ]
    if search is not None:
        pool += [
            Finalist(stage="search", setting=components_setting(best.setting), lambdas=c.lambdas, **_components(best), search_fitness=c.fitness)
            for c in search.candidates()
        ]
    ranked = sorted(pool, key=lambda f: (-f.search_fitness, distance_to_default(method, f.setting, f.lambdas)))
    seen, chosen = set(), []
    for finalist in ranked:
        identity = (finalist.components_key, tuple(round(x, 9) for x in finalist.lambdas))
        if identity not in seen:
            seen.add(identity)
            chosen.append(finalist)
        if len(chosen) == top_k:
            break
    return chosen


def _components(grid_score: GridScore) -> dict[str, str]:
    return {"components_key": grid_score.components_key, "components_folder": grid_score.components_folder}


def choose(rescored: list[Finalist]) -> Finalist:
    """The finalist with the best stage-3 fitness; ties go to the better-ranked one (search fitness)."""
    return max(enumerate(rescored), key=lambda pair: (pair[1].validation.fitness, -pair[0]))[1]


# ---------------------------------------------------------------- the leaderboard


def test_summary(scores: dict[str, Any]) -> tuple[float, float | None, dict[str, float]]:
    """(mean, standard error of the mean, per-task values) of an evaluation's `TaskScore`s."""
    values = {task: score.value for task, score in scores.items()}
    errors = [score.stderr for score in scores.values()]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if errors and all(e is not None for e in errors) else None
    return sum(values.values()) / len(values), stderr, values


def crown(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Mark the winner: the best stage-3 validation score (the test split never decides); ties: first listed."""
    best = max(range(len(rows)), key=lambda i: (rows[i].validation, -i))
    return [row.model_copy(update={"winner": i == best}) for i, row in enumerate(rows)]


def format_setting(parameters: dict[str, Any], lambdas: list[float]) -> str:
    keys = ", ".join(f"{k} {v}" for k, v in parameters.items())
    same = len(set(round(x, 6) for x in lambdas)) == 1
    lam = f"λ {lambdas[0]:.3g}" if same else f"λ {format_lambdas(lambdas)}"
    return f"{keys}, {lam}" if keys else lam


def _cells(row: LeaderboardRow) -> list[str]:
    default = "-" if row.default_test is None else f"{row.default_test:.3f}"
    stderr = "" if row.test_stderr is None else f" ± {row.test_stderr:.3f}"
    return [
        row.method + (" *" if row.winner else ""),
        format_setting(row.parameters, row.lambdas),
        f"{row.search_fitness:.3f}",
        f"{row.validation:.3f}",
        default,
        f"{row.test:.3f}{stderr}",
        str(row.evaluations),
    ]


HEADER = ["method", "tuned setting", "search", "validation", "default test", "tuned test", "evals"]


def format_leaderboard(rows: list[LeaderboardRow]) -> str:
    """A plain-text table; the winner is marked `*`."""
    return render_text(list(HEADER), [_cells(r) for r in rows], left=2)


def leaderboard_markdown(rows: list[LeaderboardRow], split: str) -> str:
    table = render_markdown(list(HEADER), [[c.replace("|", "/") for c in _cells(r)] for r in rows], left=2)
    note = (
        f"\n`search`: fitness on the search slice; `validation`: the re-scoring that chose; `tuned test`: the choice on the {split} split "
        "(± standard error); `default test`: the method's default setting; `*`: the winner (best validation).\n"
    )
    return table + "\n" + note


def leaderboard_table(rows: list[LeaderboardRow]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact (flat, JSON-friendly values)."""
    return [
        {
            "method": r.method,
            "winner": r.winner,
            "setting": format_setting(r.parameters, r.lambdas),
            "search": round(r.search_fitness, 4),
            "validation": round(r.validation, 4),
            "test": round(r.test, 4),
            "test_stderr": None if r.test_stderr is None else round(r.test_stderr, 4),
            "default_test": None if r.default_test is None else round(r.default_test, 4),
            "evaluations": r.evaluations,
        }
        for r in rows
    ]


def describe_method(row: LeaderboardRow) -> str:
    """One line per method: what each stage did and what it chose."""
    grid = ", ".join(f"{k} {v}" for k, v in row.grid_best.items())
    search = row.evaluations - row.grid_points
    return (
        f"{row.method}: grid {row.grid_points} points (best {row.grid_fitness:.3f} at {grid}) → CMA-ES {search} candidates "
        f"(stopped: {row.stopped}) → top {row.rescored} re-scored: chose {format_setting(row.parameters, row.lambdas)} from the {row.chosen_from}, "
        f"validation {row.validation:.3f}"
    )


def describe_grid(label: str, grid: list[GridScore], best: GridScore) -> str:
    setting = ", ".join(f"{k} {v}" for k, v in best.setting.items())
    return f"{label}: grid of {len(grid)} points, best {best.score.fitness:.4f} at {setting}"


# ---------------------------------------------------------------- MLflow


def log_candidates(run_id: str, label: str, stage: str, step: int, candidates: list[dict[str, Any]]) -> None:
    """A nested run per candidate of one stage (its setting, λ, per-task scores, fitness), and the stage's
    best and mean fitness on the tuning run as `<method>.<stage>_best` / `_mean` at `step`."""
    import time

    from mlflow.entities import Metric, Param

    from pipeline.tracking import client

    mlflow_client = client()
    now = int(time.time() * 1000)
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    prefix = slug(label)
    for k, candidate in enumerate(candidates):
        child = mlflow_client.create_run(
            experiment, run_name=f"{label} {stage} {step}.{k}", tags={"mlflow.parentRunId": run_id, "pcbmerge.tune.method": label, "pcbmerge.tune.stage": stage}
        )
        params = [Param(f"lambda.{i}", repr(float(x))) for i, x in enumerate(candidate["lambdas"])]
        params += [Param(key, repr(value)) for key, value in candidate.get("setting", {}).items() if key != LAMBDA]
        params += [Param("method", label), Param("stage", stage), Param("limit", str(candidate.get("limit")))]
        metrics = [Metric(f"{candidate['split']}.{task}", float(v), now, 0) for task, v in candidate["scores"].items()]
        metrics.append(Metric("fitness", float(candidate["fitness"]), now, 0))
        mlflow_client.log_batch(child.info.run_id, metrics=metrics, params=params)
        mlflow_client.set_terminated(child.info.run_id, "FINISHED")
    if candidates:
        values = [float(c["fitness"]) for c in candidates]
        summary = [Metric(f"{prefix}.{stage}_best", max(values), now, step), Metric(f"{prefix}.{stage}_mean", sum(values) / len(values), now, step)]
        mlflow_client.log_batch(run_id, metrics=summary)


def log_leaderboard(run_id: str, rows: list[dict[str, Any]], markdown: str, text: str) -> None:
    """`tune/leaderboard.md`, `.json` and `.txt`, metrics `<method>.validation` / `.test` / `.default_test`,
    and the winner as a tag."""
    import json
    import tempfile
    import time
    from pathlib import Path

    from mlflow.entities import Metric, RunTag

    from pipeline.tracking import client

    mlflow_client = client()
    now = int(time.time() * 1000)
    metrics = []
    for row in rows:
        prefix = slug(row["method"])
        metrics += [Metric(f"{prefix}.validation", row["validation"], now, 0), Metric(f"{prefix}.test", row["test"], now, 0)]
        if row.get("default_test") is not None:
            metrics.append(Metric(f"{prefix}.default_test", row["default_test"], now, 0))
    winner = next(row["method"] for row in rows if row["winner"])
    mlflow_client.log_batch(run_id, metrics=metrics, tags=[RunTag("pcbmerge.tune.winner", winner)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "leaderboard.md").write_text(markdown)
        (folder / "leaderboard.txt").write_text(text + "\n")
        (folder / "leaderboard.json").write_text(json.dumps(rows, indent=2) + "\n")
        for path in sorted(folder.iterdir()):
            mlflow_client.log_artifact(run_id, str(path), artifact_path="tune")
