"""CMA-ES coefficient search: config checks, exact resume of the optimiser, and search-flow end to end on the
micro zoo with a real Dask `LocalCluster` (two worker processes), the real Prefect engine (test harness),
real lm-eval and a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pcbcore.components import layer_group
from pcbcore.errors import MergeInputError
from pipeline.search_config import parse_search_config
from pipeline.search_state import CandidateScore, SearchState, ask_population, new_search_state, tell_population

ROUNDS = 2
POPSIZE = 3
# Paths only (nothing is read): the config and optimiser tests need no trained zoo.
PAPER_ZOO = SimpleNamespace(base="/zoo/base", experts={"a": "/zoo/a", "b": "/zoo/b"}, tasks=["a", "b"], task_dir="/zoo/tasks")


def _data(zoo, **search):
    return {
        "merge_method": "pcb",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks[:2]],
        "parameters": {"ratio": 0.2},
        "evaluation": {"tasks": zoo.tasks[:2], "include_path": str(zoo.task_dir), "limit": 4, "split": "test"},
        "search": {"budget": ROUNDS * POPSIZE, "popsize": POPSIZE, "seed": 3, "sigma0": 0.3, **search},
        "register_as": "searched",
    }


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "search, message",
    [
        ({"split": "test"}, "key 'search.split': must be 'validation': the search never sees the test split"),
        ({"bounds": [1.5, 0.5]}, "key 'search.bounds': must be [lo, hi] with lo < hi"),
        ({"start": 2.0}, "start 2.0 must lie inside bounds [0.5, 1.5]"),
        ({"start": [1.0, 1.0, 1.0]}, "key 'search.start' has 3 values for 2 models"),
        ({"popsiz": 4}, "unknown key 'search.popsiz'"),
        ({"weights": {"zoo_nope": 1.0}}, "key 'search.weights' names ['zoo_nope']"),
        ({"ratio": [0.1, 1.5]}, "every ratio must satisfy 0 < r ≤ 1"),
        ({"dask_workers": 2, "dask_address": "tcp://127.0.0.1:1"}, "not both"),
    ],
)
def test_bad_search_settings_name_the_key(search, message):
    with pytest.raises(MergeInputError) as err:
        parse_search_config(_data(PAPER_ZOO, **search), source="search.yml")
    assert message in str(err.value) and str(err.value).startswith("search.yml: ")


def test_a_search_needs_evaluation_and_ratio_grid_only_for_pcb():
    data = _data(PAPER_ZOO)
    del data["evaluation"]
    with pytest.raises(MergeInputError, match="a search needs an 'evaluation' block"):
        parse_search_config(data)
    data = _data(PAPER_ZOO, ratio=[0.1, 0.2])
    data["merge_method"], data["parameters"] = "ties", {"density": 0.5}
    with pytest.raises(MergeInputError, match="grid over PCB's ratio, but merge_method is 'ties'"):
        parse_search_config(data)


# ---------------------------------------------------------------- the optimiser, without models


def _sphere(population):
    """A stand-in fitness (maximised at λ = 1.2), as `CandidateScore`s."""
    return [
        CandidateScore(
            lambdas=x,
            scores={"t": -sum((v - 1.2) ** 2 for v in x)},
            fitness=-sum((v - 1.2) ** 2 for v in x),
            split="validation",
            build_seconds=0.0,
            eval_seconds=0.0,
            worker="here",
        )
        for x in population
    ]


def _rounds(state: SearchState, count: int, reseed: bool) -> SearchState:
    for k in range(count):
        es, population = ask_population(state)
        if reseed:  # what lm-eval does to numpy's global generator on every evaluation
            np.random.seed(1234 + k)
        state = tell_population(state, es, population, _sphere(population), 0.0)
    return state


def test_saved_state_resumes_exactly_and_starts_at_the_start():
    config = parse_search_config(_data(PAPER_ZOO, budget=100, popsize=4, start=[1.0, 0.9]))
    fresh = new_search_state(config, None, "components-key", "run")
    straight = _rounds(fresh, 5, reseed=False)
    paused = _rounds(fresh, 2, reseed=True)
    resumed = _rounds(SearchState.model_validate_json(paused.model_dump_json()), 3, reseed=True)  # saved and read back
    assert resumed.best == straight.best
    assert [c.lambdas for c in resumed.candidates()] == [c.lambdas for c in straight.candidates()]
    assert straight.rounds[0].candidates[0].lambdas == [1.0, 0.9]  # the start is the first candidate
    assert all(0.5 <= v <= 1.5 for c in straight.candidates() for v in c.lambdas)
    assert straight.best.fitness > straight.rounds[0].candidates[0].fitness
    assert not os.path.exists("outcmaes")
    assert pickle.loads(straight.cma_state).countiter == 5


def test_budget_stops_the_search_once_spent_exactly():
    """9 evaluations at 4 a round: two whole rounds and a last round of one candidate, never told to CMA-ES."""
    config = parse_search_config(_data(PAPER_ZOO, budget=9, popsize=4))
    state = new_search_state(config, None, "k", "run")
    state = _rounds(state, 2, reseed=False)
    assert state.stop is None and state.evaluations == 8
    told = state.cma_state
    state = _rounds(state, 1, reseed=False)
    assert state.stop == "budget of 9 evaluations" and state.evaluations == 9 and len(state.rounds[-1].candidates) == 1
    assert state.cma_state == told


# ---------------------------------------------------------------- the flow, end to end


@pytest.fixture(scope="module")
def dask_search(micro_zoo, prefect_harness):
    """A 2-round search on a local Dask cluster of two worker processes (one thread each)."""
    from infra.task_runners import run_search

    config = parse_search_config(_data(micro_zoo, dask_workers=2), source="test")
    return config, run_search(config)


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect_client:
        return prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_dask_search_completes_and_beats_or_matches_its_start(dask_search):
    _, outcome = dask_search
    assert outcome.finished and outcome.rounds == ROUNDS and outcome.evaluations == ROUNDS * POPSIZE
    assert outcome.best_fitness >= outcome.start_fitness
    assert all(0.5 <= v <= 1.5 for v in outcome.lambdas)
    assert outcome.model_uri == "models:/searched/1" and outcome.test_scores
    assert outcome.build_seconds < outcome.eval_seconds


def test_candidates_ran_in_the_dask_workers(dask_search):
    from pipeline.tracking import client

    _, outcome = dask_search
    workers = {e.worker for e in outcome.history if e.stage == "search"}
    assert None not in workers and not any(w.endswith(f":{os.getpid()}") for w in workers)  # not this process
    children = client().search_runs([client().get_run(outcome.run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert len(children) == outcome.evaluations
    assert {"fitness", "validation.zoo_reverse", "build_seconds"} <= set(children[0].data.metrics)
    assert {"lambda.0", "lambda.1"} <= set(children[0].data.params)


def test_test_split_is_only_seen_by_the_final_step(dask_search):
    _, outcome = dask_search
    stages = [(e.stage, e.split) for e in outcome.history]
    assert stages[:-1] == [("search", "validation")] * outcome.evaluations
    assert stages[-1] == ("final", "test")


def test_search_is_tracked_and_registered_with_its_settings(dask_search, tmp_path):
    from pipeline.registry import read_lineage
    from pipeline.tracking import client

    _, outcome = dask_search
    mlflow_client = client()
    best = mlflow_client.get_metric_history(outcome.run_id, "best_fitness")
    assert [m.step for m in best] == list(range(ROUNDS)) and best[-1].value == outcome.best_fitness
    assert len(mlflow_client.get_metric_history(outcome.run_id, "mean_fitness")) == ROUNDS
    names = {a.path for a in mlflow_client.list_artifacts(outcome.run_id, "search")}
    assert {"search/convergence.png", "search/final_lambdas.json", "search/cma_state.pkl", "search/evaluations.json"} <= names
    final = json.loads(open(mlflow_client.download_artifacts(outcome.run_id, "search/final_lambdas.json", str(tmp_path))).read())
    assert final["lambdas"] == outcome.lambdas
    tags = mlflow_client.get_model_version("searched", "1").tags
    assert tags["pcbmerge.search.evaluations"] == str(outcome.evaluations)
    assert json.loads(tags["pcbmerge.lambdas"]) == outcome.lambdas
    lineage = read_lineage(outcome.model_uri)
    assert lineage["search"]["evaluations"] == outcome.evaluations and lineage["search"]["settings"]["popsize"] == POPSIZE


def test_paused_search_resumes_to_the_same_lambdas(dask_search, micro_zoo, prefect_harness, tmp_path, capsys):
    """Stopped after round 1 and resumed (CLI, local threads): the same final λ as the uninterrupted Dask
    run with the same seed, and the resumed run evaluates only round 2's candidates."""
    import yaml

    from pcbmerge.cli import main

    _, straight = dask_search
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(_data(micro_zoo)))
    assert main(["search", str(path), "--stop-after-rounds", "1", "--json"]) == 0
    paused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert paused["rounds"] == 1 and paused["model"] is None

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    assert main(["search", str(path), "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["lambdas"] == straight.lambdas
    assert resumed["rounds"] == ROUNDS and resumed["evaluations"] == ROUNDS * POPSIZE
    # The same λ gives the same bytes as the uninterrupted search's merge: its version, not a new one.
    assert resumed["model"] == straight.model_uri == "models:/searched/1"

    with get_client(sync_client=True) as prefect_client:
        last = prefect_client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)[0]
    candidates = [r for r in _task_runs(last.id) if r.name.startswith("candidate")]
    assert sorted(r.name.split()[1] for r in candidates) == [f"r1.{i}" for i in range(POPSIZE)]


def test_a_raised_budget_lets_a_finished_search_go_on():
    from pipeline.search_state import resume_state

    config = parse_search_config(_data(PAPER_ZOO, budget=8, popsize=4))
    state = _rounds(new_search_state(config, None, "k", "run"), 2, reseed=False)
    assert state.stop is not None
    again = resume_state(state, parse_search_config(_data(PAPER_ZOO, budget=12, popsize=4)))
    assert again.stop is None and again.budget == 12
    assert resume_state(state, config).stop == state.stop


def test_layer_groups_split_the_layers_and_build_per_block(tiny_zoo, tmp_path):
    """Genome rows apply to their blocks: with G=2, a row of zeros gives the base in that block only."""
    import torch

    from pcbcore.components import StoredComponents, compute_components
    from pcbcore.config import parse_merge_config

    assert [layer_group(f"model.layers.{i}.mlp.up_proj.weight", 4, 2) for i in range(4)] == [0, 0, 1, 1]
    assert layer_group("model.embed_tokens.weight", 4, 2) == 0 and layer_group("model.norm.weight", 4, 2) == 1
    base, models = tiny_zoo
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(m)} for m in models]}
    folder = compute_components(parse_merge_config(data), tmp_path / "components", device="cpu")
    stored = StoredComponents(folder, device="cpu")
    n = stored.n_models
    assert torch.equal(stored.state_dict([1.0] * n, groups=1)["model.norm.weight"], stored.state_dict([1.0] * n)["model.norm.weight"])
    grouped = stored.state_dict([0.0] * n + [1.0] * n, groups=2)
    ones, zeros = stored.state_dict([1.0] * n), stored.state_dict([0.0] * n)
    for name in grouped:
        if name not in stored.names:
            continue
        expected = zeros if layer_group(name, 2, 2) == 0 else ones
        assert torch.allclose(grouped[name], expected[name]), name
    config = parse_search_config(_data(PAPER_ZOO, layer_groups=3))
    assert len(ask_population(new_search_state(config, None, "k", "run"))[1][0]) == 3 * 2


def test_layer_grouped_search_writes_and_registers_its_merge(micro_zoo, prefect_harness):
    """One round with λ per (layer block × model): the final merge is written from the stored components
    and its lineage records the whole genome."""
    from infra.task_runners import run_search
    from pipeline.evaluation import load_model
    from pipeline.registry import read_lineage

    data = _data(micro_zoo, layer_groups=2, budget=2, popsize=2)
    data["register_as"] = "searched-groups"
    outcome = run_search(parse_search_config(data, source="test"))
    assert outcome.finished and outcome.evaluations == 2 and len(outcome.lambdas) == 2 * 2
    model, _ = load_model(outcome.folder)  # a loadable Hugging Face folder
    assert model.config.num_hidden_layers == 2
    lineage = read_lineage(outcome.model_uri)
    assert lineage["lambdas"] == outcome.lambdas and lineage["search"]["layer_groups"] == 2


def _constant(population, value=0.25):
    return [
        CandidateScore(lambdas=x, scores={"t": value}, fitness=value, split="validation", build_seconds=0.0, eval_seconds=0.0, worker="here")
        for x in population
    ]


def test_flat_fitness_does_not_end_a_search_before_several_identical_rounds():
    """A coarse fitness often scores a whole round the same; pycma's flat-fitness stop would end the search
    after that first round. Only several identical rounds are a reason to stop, and the reason is said."""
    from pipeline.search_state import FLAT_ROUNDS, stop_kind

    config = parse_search_config(_data(PAPER_ZOO, budget=100, popsize=4))
    state = new_search_state(config, None, "k", "run")
    for k in range(FLAT_ROUNDS):
        assert state.stop is None, f"stopped after {k} rounds: {state.stop}"
        es, population = ask_population(state)
        state = tell_population(state, es, population, _constant(population), 0.0)
    assert stop_kind(state.stop) == "flat" and state.evaluations == FLAT_ROUNDS * 4
    assert state.best.lambdas == [1.0, 1.0]  # all tied: the start


def test_ties_in_fitness_go_to_the_candidate_nearest_the_start():
    config = parse_search_config(_data(PAPER_ZOO, budget=100, popsize=6, sigma0=0.4))
    state = new_search_state(config, None, "k", "run")
    es, population = ask_population(state)
    scores = _constant(population, 1.0)
    scores[0] = scores[0].model_copy(update={"fitness": 0.0})  # the start itself scores worse
    state = tell_population(state, es, population, scores, 0.0)
    tied = population[1:]
    nearest = min(tied, key=lambda x: sum((v - 1.0) ** 2 for v in x))
    assert nearest != tied[0]  # so the earliest of the tied is not the answer by accident
    assert state.best.lambdas == nearest


def test_a_union_vocabulary_search_scores_and_writes_its_merge_in_that_vocabulary(micro_zoo, prefect_harness, tmp_path):
    """`tokenizer_source: union` through the search: the stored components build the base in the union's rows,
    the candidates are scored with the union tokenizer, and the written winner is `pcbmerge merge` of the
    config with the winner's λ (tokenizer files and embeddings equal)."""
    import torch
    from builders import save_with_added_tokens
    from safetensors.torch import load_file

    from flows.search import search_flow
    from pcbcore.components import StoredComponents
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_to_folder
    from pipeline.model_pool import load_tokenizer
    from pipeline.references import fetch
    from pipeline.settings import load_settings
    from tasks.components import components_folder

    first, second = (micro_zoo.experts[t] for t in micro_zoo.tasks[:2])
    extra = save_with_added_tokens(second, tmp_path / "extra", ["<x1>", "<x2>"], seed=3)
    data = _data(micro_zoo, budget=2, popsize=2)
    data.update(models=[{"model": str(first)}, {"model": str(extra)}], tokenizer_source="union", register_as=None)
    data["evaluation"]["limit"] = 2
    config = parse_search_config(data, source="test")
    outcome = search_flow(config)
    assert outcome.finished and outcome.evaluations == 2

    written = tmp_path / "direct"
    models = [{"model": m["model"], "parameters": {"lambda": x}} for m, x in zip(data["models"], outcome.lambdas)]
    merge_to_folder(parse_merge_config({**config.merge_data(), "models": models}), written, device="cpu")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (written / name).read_text() == Path(outcome.folder, name).read_text(), name
    ours, theirs = load_file(f"{outcome.folder}/model.safetensors"), load_file(written / "model.safetensors")
    rows = theirs["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads(open(f"{outcome.folder}/config.json").read())["vocab_size"] == rows == len(load_tokenizer(str(written)))

    cache = str(load_settings().cache_dir)
    inputs = {ref: fetch(ref, cache) for ref in config.references()}
    stored = StoredComponents(components_folder(config, inputs, cache)[1], device="cpu")
    assert stored.form == "stored" and stored.vocab_rows == rows and len(load_tokenizer(str(stored.side_files))) == rows
    built = stored.state_dict(outcome.lambdas, dtype=torch.float32)["model.embed_tokens.weight"]
    torch.testing.assert_close(built, theirs["model.embed_tokens.weight"], atol=2e-3, rtol=2e-3)  # bf16-stored components


def test_stored_components_read_a_lora_base_as_the_merge_does(tiny_zoo, tmp_path):
    """A `model+lora` base: the candidate's θ_pre is the base with its adapter applied, so a stored candidate
    is the merge itself up to the bf16 rounding of the components."""
    import torch
    from builders import save_lora_adapter
    from safetensors.torch import load_file

    from pcbcore.components import StoredComponents, compute_components
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_to_folder
    from pcbcore.lora import open_model

    base, models = tiny_zoo
    lora = save_lora_adapter(base, tmp_path / "lora", seed=1)
    lambdas = [0.8, 1.2, 1.0]
    data = {"merge_method": "ties", "base_model": f"{base}+{lora}", "parameters": {"density": 0.2}}
    data["models"] = [{"model": str(m), "parameters": {"lambda": x}} for m, x in zip(models, lambdas)]
    config = parse_merge_config(data)
    stored = StoredComponents(compute_components(config, tmp_path / "c", device="cpu"), device="cpu")
    merge_to_folder(config, tmp_path / "merged", device="cpu")
    merged, plain = load_file(tmp_path / "merged" / "model.safetensors"), load_file(Path(base) / "model.safetensors")
    built, at_zero = stored.state_dict(lambdas, dtype=torch.float32), stored.state_dict([0.0] * 3, dtype=torch.float32)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert stored.form == "stored" and torch.equal(at_zero[q], open_model(f"{base}+{lora}").read(q))  # θ_pre: the adapter applied
    assert not torch.allclose(at_zero[q], plain[q], atol=1e-3)
    for name in stored.names:
        moved = (merged[name] - at_zero[name]).abs().max()
        assert (built[name] - merged[name]).abs().max() <= 2**-8 * moved + 1e-6, name
