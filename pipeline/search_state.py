"""The CMA-ES search's state and its ask/tell steps, with no Prefect in sight.

One round is one CMA-ES generation (pycma's ask/tell: the optimiser never calls the objective, so a whole
population can go out as parallel Prefect tasks):

    es, population = ask_population(state)                     # λ vectors, inside the bounds
    scores = [score of each candidate request]                 # in parallel, on the flow's task runner
    state = tell_population(state, es, population, scores)     # fitnesses back, best-so-far updated

The optimiser's random numbers come from its own `numpy.random.RandomState` (pycma's `randn` option), which
is pickled with it: lm-eval reseeds numpy's global generator on every evaluation, and a resumed search must
draw exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.cache_keys import digest, task_files
from pipeline.evaluation import LM_EVAL_VERSION
from pipeline.search_config import SearchPipelineConfig

# ---------------------------------------------------------------- records


class CandidateRequest(BaseModel):
    """Everything a worker needs to build and score one candidate (paths and numbers only)."""

    components_folder: str
    components_key: str
    tokenizer_folder: str
    lambdas: list[float]  # the genome: n_models values, or layer_groups × n_models (group-major)
    layer_groups: int = 1
    tasks: list[str]
    include_path: str | None
    split: str
    limit: int | None
    batch_size: int
    weights: dict[str, float] | None
    device: str
    cache_dir: str


class CandidateScore(BaseModel):
    """What the candidate task returns (and Prefect caches): scores of one λ, and where the time went."""

    lambdas: list[float]
    scores: dict[str, float]
    fitness: float
    split: str
    build_seconds: float
    eval_seconds: float
    worker: str


class Candidate(CandidateScore):
    """A scored candidate placed in the search: its round, its index in the population, its PCB ratio."""

    round: int
    index: int
    ratio: float | None


class RoundRecord(BaseModel):
    round: int
    ratio: float | None
    candidates: list[Candidate]
    best_fitness: float  # best so far, this round included
    mean_fitness: float  # of this round's population
    build_seconds: float  # summed over the population
    eval_seconds: float
    seconds: float  # wall time of the round


class SearchState(BaseModel):
    """What is saved after every round: enough to resume exactly where the search stopped."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    key: str
    run_id: str
    ratio: float | None
    cma_state: bytes  # pickled cma.CMAEvolutionStrategy, its RandomState included
    popsize: int
    budget: int  # evaluations allowed for this ratio
    rounds: list[RoundRecord] = []
    best: Candidate | None = None
    stop: str | None = None  # why the search of this ratio ended (None: not ended)

    @property
    def evaluations(self) -> int:
        return sum(len(r.candidates) for r in self.rounds)

    def candidates(self) -> list[Candidate]:
        return [c for r in self.rounds for c in r.candidates]


# ---------------------------------------------------------------- ask / tell


def search_key(config: SearchPipelineConfig, ratio: float | None, components_key: str) -> str:
    """Names a search: its components (inputs, method, parameters), its settings and its fitness.
    The budget is left out, so a finished search resumed with a larger budget goes on."""
    evaluation = config.evaluation
    fitness = [evaluation.tasks, task_files(evaluation.include_path), config.search.limit or evaluation.limit, LM_EVAL_VERSION]
    return digest([components_key, ratio, config.search.identity(), fitness])


def budget_share(config: SearchPipelineConfig) -> int:
    """Evaluations per ratio: the budget split evenly over the ratio grid."""
    return max(1, config.search.budget // len(config.ratios()))


def new_search_state(config: SearchPipelineConfig, ratio: float | None, components_key: str, run_id: str) -> SearchState:
    """A fresh CMA-ES at the start λ; the start itself is the first candidate of round 0 (so the search's
    best is never worse than where it started)."""
    import cma

    n_models = len(config.models)
    search = config.search
    start = (search.start if isinstance(search.start, list) else [search.start] * n_models) * search.layer_groups
    options = {
        "bounds": list(search.bounds),
        "randn": np.random.RandomState(search.seed).randn,
        "verbose": -9,
        "verb_log": 0,  # no ./outcmaes
        "verb_disp": 0,
    }
    if search.popsize:
        options["popsize"] = search.popsize
    es = cma.CMAEvolutionStrategy([float(x) for x in start], search.sigma0, options)
    es.inject([start], force=True)
    return SearchState(
        key=search_key(config, ratio, components_key),
        run_id=run_id,
        ratio=ratio,
        cma_state=pickle.dumps(es),
        popsize=es.popsize,
        budget=budget_share(config),
    )


def resume_state(state: SearchState, config: SearchPipelineConfig) -> SearchState:
    """A saved state under the config's current budget: a search that ran out of budget goes on when the
    budget has been raised (the budget does not change the search's path, so it is not in its key)."""
    budget = budget_share(config)
    stop = state.stop
    if stop is not None and stop.startswith("budget") and state.evaluations + state.popsize <= budget:
        stop = None
    return state.model_copy(update={"budget": budget, "stop": stop})


def ask_population(state: SearchState) -> tuple[Any, list[list[float]]]:
    """The optimiser (unpickled from the state) and its next population of λ vectors."""
    es = pickle.loads(state.cma_state)
    return es, [[float(x) for x in candidate] for candidate in es.ask()]


def tell_population(state: SearchState, es: Any, population: list[list[float]], scores: list[CandidateScore], seconds: float) -> SearchState:
    """Tell the fitnesses (cma minimises, so it gets −fitness); returns the state after this round."""
    es.tell([np.asarray(x) for x in population], [-s.fitness for s in scores])
    number = len(state.rounds)
    candidates = [Candidate(**s.model_dump(), round=number, index=i, ratio=state.ratio) for i, s in enumerate(scores)]
    best = max([c for c in [state.best] if c is not None] + candidates, key=lambda c: c.fitness)
    record = RoundRecord(
        round=number,
        ratio=state.ratio,
        candidates=candidates,
        best_fitness=best.fitness,
        mean_fitness=sum(c.fitness for c in candidates) / len(candidates),
        build_seconds=sum(c.build_seconds for c in candidates),
        eval_seconds=sum(c.eval_seconds for c in candidates),
        seconds=seconds,
    )
    done = state.evaluations + len(candidates)
    stop = None
    if done + state.popsize > state.budget:
        stop = f"budget of {state.budget} evaluations"
    elif es.stop():
        stop = "cma: " + ", ".join(f"{k}={v}" for k, v in es.stop().items())
    return state.model_copy(update={"cma_state": pickle.dumps(es), "rounds": [*state.rounds, record], "best": best, "stop": stop})


def candidate_requests(
    config: SearchPipelineConfig, components_folder: str, components_key: str, tokenizer_folder: str, population: list[list[float]], cache_dir: str, device: str
) -> list[CandidateRequest]:
    evaluation = config.evaluation
    return [
        CandidateRequest(
            components_folder=components_folder,
            components_key=components_key,
            tokenizer_folder=tokenizer_folder,
            lambdas=lambdas,
            layer_groups=config.search.layer_groups,
            tasks=list(evaluation.tasks),
            include_path=evaluation.include_path,
            split=config.search.split,
            limit=config.search.limit or evaluation.limit,
            batch_size=evaluation.batch_size,
            weights=config.search.weights,
            device=device,
            cache_dir=cache_dir,
        )
        for lambdas in population
    ]


def fitness_of(scores: dict[str, float], weights: dict[str, float] | None) -> float:
    """Mean of the task scores, weighted by `weights` (tasks it leaves out weigh 0) when given."""
    if weights is None:
        return sum(scores.values()) / len(scores)
    total = sum(weights.get(t, 0.0) for t in scores)
    return sum(weights.get(t, 0.0) * v for t, v in scores.items()) / total


def describe_round(record: RoundRecord, state: SearchState) -> str:
    best = state.best
    share = record.build_seconds / max(record.build_seconds + record.eval_seconds, 1e-9)
    return (
        f"round {record.round}{'' if state.ratio is None else f' (ratio {state.ratio})'}: "
        f"{len(record.candidates)} candidates, mean fitness {record.mean_fitness:.4f}, best so far {best.fitness:.4f} "
        f"at λ={format_lambdas(best.lambdas)}; build {record.build_seconds:.2f}s vs evaluate {record.eval_seconds:.2f}s "
        f"({100 * share:.1f}% building); {state.evaluations}/{state.budget} evaluations"
    )


def format_lambdas(lambdas: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in lambdas) + "]"
