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
    dtype: str = "auto"  # evaluation.dtype: the precision the candidate is scored in
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = True


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
    stop: str | None = None  # why the search of this ratio ended (None: not ended); its first word is `stop_kind`
    start: list[float] = []  # the start genome: ties in fitness go to the candidate nearest it

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
    options = evaluation.model_dump(include={"dtype", "apply_chat_template", "fewshot_as_multiturn"}, exclude_defaults=True)
    if options:  # scoring options at their defaults keep the keys of searches saved before they existed
        fitness.append(options)
    return digest([components_key, ratio, config.search.identity(), fitness])


def budget_share(config: SearchPipelineConfig) -> int:
    """Evaluations per ratio: the budget split evenly over the ratio grid."""
    return max(1, config.search.budget // len(config.ratios()))


# pycma's stops on the fitness values alone (a flat generation, a tiny fitness range, no improvement for a
# while) are switched off: with a small validation split the fitness is coarse and a whole generation often
# scores the same, which says nothing about the λ around it. The search ends on its budget, on flat fitness
# by its own rule (`FLAT_ROUNDS`), or on pycma's stops on the search distribution (converged, sigma).
FITNESS_STOPS_OFF = {"tolflatfitness": 10**9, "tolfun": 0, "tolfunhist": 0, "tolfunrel": 0, "tolstagnation": 10**9}
FITNESS_STOPS = {"tolflatfitness", "tolfun", "tolfunhist", "tolfunrel", "tolstagnation", "maxfevals", "maxiter"}
SIGMA_STOPS = {"tolupsigma", "tolfacupx"}  # the step size ran away: "sigma"; every other pycma stop: "converged"
FLAT_ROUNDS = 3  # a search is flat once every candidate of this many full rounds in a row scored the same


def stop_kind(stop: str | None) -> str | None:
    """`budget`, `flat`, `converged` or `sigma` (None while the search goes on)."""
    return None if stop is None else stop.split(":")[0].split()[0]


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
        **FITNESS_STOPS_OFF,
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
        start=[float(x) for x in start],
    )


def resume_state(state: SearchState, config: SearchPipelineConfig) -> SearchState:
    """A saved state under the config's current budget: a search that ran out of budget goes on when the
    budget has been raised (the budget does not change the search's path, so it is not in its key)."""
    budget = budget_share(config)
    stop = state.stop
    if stop_kind(stop) == "budget" and state.evaluations < budget:
        stop = None
        rounds = state.rounds
        if rounds and len(rounds[-1].candidates) < state.popsize:
            # The last round was cut to the old budget and never told to CMA-ES (its state is from before
            # that ask): drop it, so the round is asked again whole (its candidates come from the cache).
            rounds = rounds[:-1]
            kept = [c for r in rounds for c in r.candidates]
            state = state.model_copy(update={"rounds": rounds, "best": best_candidate(kept, state.start) if kept else None})
    return state.model_copy(update={"budget": budget, "stop": stop})


def ask_population(state: SearchState) -> tuple[Any, list[list[float]]]:
    """The optimiser (unpickled from the state) and its next population of λ vectors, cut to the budget
    left: the last round may be partial, so a search spends exactly its budget."""
    es = pickle.loads(state.cma_state)
    population = [[float(x) for x in candidate] for candidate in es.ask()]
    return es, population[: max(1, state.budget - state.evaluations)]


def best_candidate(candidates: list[Candidate], start: list[float]) -> Candidate:
    """The fittest; ties go to the candidate nearest the start (then to the earliest): with a coarse fitness
    many λ score the same, and the start is the setting that was chosen for a reason."""

    def distance(c: Candidate) -> float:
        return sum((a - b) ** 2 for a, b in zip(c.lambdas, start)) if start else 0.0

    return max(enumerate(candidates), key=lambda pair: (pair[1].fitness, -distance(pair[1]), -pair[0]))[1]


def tell_population(state: SearchState, es: Any, population: list[list[float]], scores: list[CandidateScore], seconds: float) -> SearchState:
    """Tell the fitnesses (cma minimises, so it gets −fitness); returns the state after this round.

    A partial population (the budget's last round) is not told: the search ends with it, and its saved
    CMA-ES state stays the one from before the ask, so a raised budget asks that round again whole."""
    whole = len(population) == es.popsize
    if whole:
        es.tell([np.asarray(x) for x in population], [-s.fitness for s in scores])
    number = len(state.rounds)
    candidates = [Candidate(**s.model_dump(), round=number, index=i, ratio=state.ratio) for i, s in enumerate(scores)]
    best = best_candidate([c for c in [state.best] if c is not None] + candidates, state.start)
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
    rounds = [*state.rounds, record]
    done = state.evaluations + len(candidates)
    stop = None
    if done >= state.budget:
        stop = f"budget of {state.budget} evaluations"
    elif flat_rounds(rounds):
        stop = f"flat: all {FLAT_ROUNDS * state.popsize} candidates of the last {FLAT_ROUNDS} rounds scored {record.mean_fitness:.4f}"
    else:
        stops = {k: v for k, v in es.stop().items() if k not in FITNESS_STOPS}
        if stops:
            kind = "sigma" if set(stops) & SIGMA_STOPS else "converged"
            stop = f"{kind}: cma " + ", ".join(f"{k}={v}" for k, v in stops.items())
    cma_state = pickle.dumps(es) if whole else state.cma_state
    return state.model_copy(update={"cma_state": cma_state, "rounds": rounds, "best": best, "stop": stop})


def flat_rounds(rounds: list[RoundRecord]) -> bool:
    """Every candidate of the last `FLAT_ROUNDS` rounds scored exactly the same."""
    last = rounds[-FLAT_ROUNDS:]
    if len(last) < FLAT_ROUNDS:
        return False
    values = {c.fitness for r in last for c in r.candidates}
    return len(values) == 1


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
            dtype=evaluation.dtype,
            apply_chat_template=evaluation.apply_chat_template,
            fewshot_as_multiturn=evaluation.fewshot_as_multiturn,
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
