"""CMA-ES coefficient search: the candidate task, the ask/tell helpers and the saved search state.

One round is one CMA-ES generation (pycma's ask/tell: the optimiser never calls the objective, so a whole
population can go out as parallel Prefect tasks):

    es, population = ask_population(state)                     # λ vectors, inside the bounds
    scores = evaluate_candidate.map(candidate requests)        # in parallel, on the flow's task runner
    state = tell_population(state, es, population, scores)     # fitnesses back, best-so-far updated
    save_search_state(state)                                   # Prefect result storage (+ MLflow, in the flow)

A candidate is θ_pre + Σ λ_i C_i (SPEC eq. 1) built in memory from the stored components on the worker's
device and loaded into a model kept by the worker: components and models are loaded once per worker
process (`_WorkerCache`), never written as a checkpoint. Its score is cached by Prefect on (components
key, λ, tasks, split, limit, task files, lm-eval version), so a resumed search never evaluates the same
candidate twice.

The optimiser's random numbers come from its own `numpy.random.RandomState` (pycma's `randn` option), which
is pickled with it: lm-eval reseeds numpy's global generator on every evaluation, and a resumed search must
draw exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from pcbcore.device import resolve_device
from pcbcore.executor import StoredComponents
from pcbmerge.evaluation import LM_EVAL_VERSION, evaluate_model
from pcbmerge.search_config import SearchPipelineConfig
from tasks._keys import digest
from tasks.evaluate import _task_files

STATE_PREFIX = "pcbmerge-search-state-"


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
    fitness = [evaluation.tasks, _task_files(evaluation.include_path), config.search.limit or evaluation.limit, LM_EVAL_VERSION]
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


# ---------------------------------------------------------------- the candidate task


class _WorkerCache:
    """Per worker process: the stored components (loaded once per folder and device) and a pool of models
    to load candidates into (one per candidate running at once in this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.components: dict[tuple[str, str], StoredComponents] = {}
        self.free_models: dict[tuple[str, str, str], list[tuple[Any, Any]]] = {}

    def stored(self, folder: str, device: str) -> StoredComponents:
        with self.lock:
            if (folder, device) not in self.components:
                self.components[(folder, device)] = StoredComponents(folder, device=device)
            return self.components[(folder, device)]

    def take_model(self, base_dir: str, tokenizer_dir: str, device: str) -> tuple[Any, Any]:
        # Loading under the lock: transformers' and lm-eval's lazy imports are not safe from parallel
        # threads (a race gives "cannot import name 'AutoModelForCausalLM'"), and one load at a time
        # bounds peak memory.
        with self.lock:
            pool = self.free_models.setdefault((base_dir, tokenizer_dir, device), [])
            if pool:
                return pool.pop()
            from lm_eval.models.huggingface import HFLM  # noqa: F401  (imported once, here)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False).to(device).eval()
            return model, AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)

    def give_back(self, base_dir: str, tokenizer_dir: str, device: str, pair: tuple[Any, Any]) -> None:
        with self.lock:
            self.free_models.setdefault((base_dir, tokenizer_dir, device), []).append(pair)


_WORKER = _WorkerCache()


def worker_cache() -> _WorkerCache:
    """This process's cache. Tasks reach it through this function: Prefect tasks are cloudpickled by value
    for Dask, and a function is pickled by reference while a global holding a lock cannot be pickled."""
    return _WORKER


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_group(name: str, n_layers: int, groups: int) -> int:
    """The block of a tensor: layer ℓ of L goes to ⌊ℓ·G/L⌋; tensors outside the layers go with the first
    block when they are embeddings and with the last otherwise (final norm, head)."""
    found = LAYER_INDEX.search(name)
    if found:
        return int(found.group(1)) * groups // n_layers
    return 0 if "embed" in name else groups - 1


def candidate_weights(components: StoredComponents, genome: list[float], groups: int = 1) -> dict:
    """θ_pre + Σ λ_i C_i for every tensor; with `groups` > 1, λ is the genome's row for the tensor's block."""
    if groups == 1:
        return components.state_dict(genome)
    import torch

    from pcbcore.methods import combine

    n = components.n_models
    if len(genome) != groups * n:
        raise ValueError(f"{len(genome)} coefficients given for {groups} layer groups × {n} models")
    rows = torch.tensor(genome, dtype=torch.float32).reshape(groups, n)
    indices = [int(m.group(1)) for name in components.components if (m := LAYER_INDEX.search(name))]
    n_layers = max(indices) + 1 if indices else 1
    out = {}
    for name, comps in components.components.items():
        lambdas = rows[layer_group(name, n_layers, groups)]
        merged = combine(components.base[name].reshape(-1), comps.reshape(n, -1), lambdas).reshape(comps.shape[1:])
        out[name] = merged.to(components.out_dtypes[name])
    out.update(components.passthrough)
    return out


def build_candidate(model: Any, components: StoredComponents, lambdas: list[float], groups: int = 1) -> None:
    """Load θ_pre + Σ λ_i C_i into `model` in place (tied weights stay tied: only the file's keys load)."""
    weights = candidate_weights(components, lambdas, groups)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if name not in weights and _is_tied(model, name)}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"components do not fit the model: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")


def _is_tied(model: Any, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _candidate_cache_key(context, parameters) -> str:
    request: CandidateRequest = parameters["request"]
    fitness = [request.tasks, request.split, request.limit, request.weights, _task_files(request.include_path), LM_EVAL_VERSION]
    genome = [float(x) for x in request.lambdas]
    return "candidate-" + digest([request.components_key, genome if request.layer_groups == 1 else [request.layer_groups, genome], fitness])


# No `timeout_seconds`: candidates run in worker threads (local threads, or a Dask worker's thread), where
# Prefect cannot interrupt a blocking evaluation and only logs a warning per candidate.
@task(cache_key_fn=_candidate_cache_key, persist_result=True, task_run_name="candidate {label}")
def evaluate_candidate(request: CandidateRequest, label: str = "") -> CandidateScore:
    """Build one candidate in memory from the stored components and score it on the search split."""
    device = str(resolve_device(request.device))
    cache = worker_cache()
    components = cache.stored(request.components_folder, device)
    base_dir = str(components.base_dir)
    pair = cache.take_model(base_dir, request.tokenizer_folder, device)
    try:
        started = time.perf_counter()
        build_candidate(pair[0], components, request.lambdas, request.layer_groups)
        built = time.perf_counter()
        result = evaluate_model(
            pair[0],
            pair[1],
            request.tasks,
            include_path=request.include_path,
            split=request.split,
            limit=request.limit,
            device=device,
            batch_size=request.batch_size,
            cache_dir=Path(request.cache_dir) / "eval",
        )
        evaluated = time.perf_counter()
    finally:
        cache.give_back(base_dir, request.tokenizer_folder, device, pair)
    scores = {name: score.value for name, score in result.scores.items()}
    fitness = fitness_of(scores, request.weights)
    get_run_logger().info("λ=%s fitness %.4f (build %.3fs, evaluate %.2fs)", _fmt(request.lambdas), fitness, built - started, evaluated - built)
    return CandidateScore(
        lambdas=request.lambdas,
        scores=scores,
        fitness=fitness,
        split=request.split,
        build_seconds=round(built - started, 6),
        eval_seconds=round(evaluated - built, 6),
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


def _fmt(lambdas: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in lambdas) + "]"


# ---------------------------------------------------------------- saved state


def _storage():
    """The flow's result storage (a Prefect filesystem block: local by default, S3/GCS/... if configured)."""
    from prefect.results import get_default_result_storage, get_result_store

    return get_result_store().result_storage or get_default_result_storage(_sync=True)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, task_run_name="save search state")
def save_search_state(state: SearchState) -> None:
    """Write the state (JSON, the CMA-ES pickle in base64) into the flow's result storage, keyed by the search."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    result = _storage().write_path(STATE_PREFIX + state.key, state.model_dump_json().encode())
    if hasattr(result, "__await__"):
        run_coro_as_sync(result)


def load_search_state(key: str) -> SearchState | None:
    """The state saved by the last finished round of the search `key`, or None if there is none."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        content = _storage().read_path(STATE_PREFIX + key)
        if hasattr(content, "__await__"):
            content = run_coro_as_sync(content)
    except (ValueError, OSError):  # LocalFileSystem: ValueError "path does not exist"
        return None
    return SearchState.model_validate_json(content)


def describe_round(record: RoundRecord, state: SearchState) -> str:
    best = state.best
    share = record.build_seconds / max(record.build_seconds + record.eval_seconds, 1e-9)
    return (
        f"round {record.round}{'' if state.ratio is None else f' (ratio {state.ratio})'}: "
        f"{len(record.candidates)} candidates, mean fitness {record.mean_fitness:.4f}, best so far {best.fitness:.4f} "
        f"at λ={_fmt(best.lambdas)}; build {record.build_seconds:.2f}s vs evaluate {record.eval_seconds:.2f}s "
        f"({100 * share:.1f}% building); {state.evaluations}/{state.budget} evaluations"
    )


def default_popsize(n_models: int) -> int:
    return 4 + int(3 * math.log(n_models))


# ---------------------------------------------------------------- the final merge of a layer-grouped genome


@task(cache_policy=NO_CACHE, task_run_name="merge layer groups")
def merge_layer_groups(
    config: SearchPipelineConfig, components_folder: str, components_key: str, genome: list[float], tokenizer_folder: str, cache_dir: str, device: str
):
    """Write the merge a per-layer-group genome names (the streaming merge takes one λ per model, so this one
    is built from the stored components, like a candidate, and saved with transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pcbcore.checkpoint import atomic_output
    from tasks.fetch import fingerprint_folder
    from tasks.merge import MergedCheckpoint

    groups = config.search.layer_groups
    key = digest([components_key, groups, [float(x) for x in genome]])
    folder = Path(config.output).expanduser().resolve() if config.output else Path(cache_dir) / "merges" / key[:24]
    marker = folder / "pcbmerge_search.json"
    started = time.perf_counter()
    reused = marker.is_file() and marker.read_text().strip() == key
    if not reused:
        stored = StoredComponents(components_folder, device=str(resolve_device(device)))
        model = AutoModelForCausalLM.from_pretrained(stored.base_dir, trust_remote_code=False)
        build_candidate(model, stored, genome, groups)
        with atomic_output(folder, overwrite=config.overwrite or not config.output) as tmp:
            model.to("cpu").save_pretrained(tmp)
            AutoTokenizer.from_pretrained(tokenizer_folder, trust_remote_code=False).save_pretrained(tmp)
            (tmp / "pcbmerge_search.json").write_text(key + "\n")
        get_run_logger().info("wrote the %d-group merge to %s", groups, folder)
    return MergedCheckpoint(
        folder=str(folder),
        key=key,
        fingerprint=fingerprint_folder(folder, Path(cache_dir) / "digests"),
        method=config.merge_method,
        lambdas=[float(x) for x in genome],
        reused=reused,
        seconds=round(time.perf_counter() - started, 3),
    )
