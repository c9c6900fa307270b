"""The tuner (grid → CMA-ES → re-scoring per method, one budget each; only the choices see the test split),
the search spending its budget, and the evaluation options — on the micro zoo with the real Prefect engine
(test harness), real lm-eval and a real SQLite MLflow store."""

from __future__ import annotations

import glob
import json
from types import SimpleNamespace

import pytest
import yaml

from pcbcore.errors import MergeInputError
from pipeline.tune_config import DEFAULT_METHODS, parse_tune_config

PAPER_ZOO = SimpleNamespace(base="/zoo/base", experts={"a": "/zoo/a", "b": "/zoo/b"}, tasks=["a", "b"], task_dir="/zoo/tasks")
BUDGET = 6
METHODS = [
    {"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}},  # the default λ 0.4 is added to it
    {"method": "pcb", "label": "pcb (release)", "parameters": {"variant": "release"}, "grid": {"ratio": [0.1, 0.2], "lambda": [1.0, 1.5]}},
]


def _data(zoo, **tune):
    return {
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks[:2]],
        "evaluation": {"tasks": zoo.tasks[:2], "include_path": str(zoo.task_dir), "split": "test"},
        "tune": {"methods": METHODS, "budget": BUDGET, "limit": 8, "top_k": 2, "popsize": 2, "report_defaults": True, **tune},
        "register_as": "tuned",
    }


# ---------------------------------------------------------------- config


def test_default_methods_and_grids_follow_the_papers_and_hold_their_defaults():
    data = _data(PAPER_ZOO)
    data["tune"] = {}
    config = parse_tune_config(data)
    assert [m.name() for m in config.tune.methods] == ["task_arithmetic", "ties", "dare_ties", "pcb (paper)", "pcb (release)"]
    assert len(config.tune.methods) == len(DEFAULT_METHODS)
    for method in config.tune.methods:
        assert method.default_setting() in method.points(), method.name()
        assert len(method.points()) <= config.tune.budget
    pcb = config.tune.methods[3].full_grid()
    assert min(pcb["ratio"]) == 0.05 and max(pcb["ratio"]) == 0.2 and min(pcb["lambda"]) == 0.8 and max(pcb["lambda"]) == 2.2
    assert set(config.tune.methods[1].full_grid()) == {"density", "lambda"}


def test_subspace_and_consensus_methods_have_their_papers_defaults_and_grids():
    data = _data(PAPER_ZOO)
    data["tune"] = {"methods": ["tsv", "iso_c", "iso_cts", "cart", "consensus_ta", "consensus_ties"]}
    config = parse_tune_config(data)
    methods = {m.name(): m for m in config.tune.methods}
    for method in methods.values():
        assert method.default_setting() in method.points(), method.name()
        assert len(method.points()) <= config.tune.budget
    for name in ("tsv", "iso_c", "iso_cts"):  # λ is their α (linear in the components): no SVD per grid point
        assert methods[name].default_setting() == {"lambda": 1.0} and set(methods[name].full_grid()) == {"lambda"}
    assert methods["cart"].default_setting() == {"alpha": 2.0, "lambda": 1.0}
    assert set(methods["cart"].full_grid()) == {"alpha", "lambda"}
    # the consensus masks take their underlying method's default and grid
    for name, base in (("consensus_ta", "task_arithmetic"), ("consensus_ties", "ties")):
        twin = parse_tune_config({**data, "tune": {"methods": [base]}}).tune.methods[0]
        assert methods[name].default_setting() == twin.default_setting() and methods[name].full_grid() == twin.full_grid()


def test_a_given_grid_gets_the_default_setting_added():
    config = parse_tune_config(_data(PAPER_ZOO))
    assert config.tune.methods[0].full_grid() == {"lambda": [0.4, 0.5, 1.0]}
    assert {"ratio": 0.1, "lambda": 1.0} in config.tune.methods[1].points()


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"methods": ["tie"]}, "unknown merge method 'tie'"),
        ({"methods": [{"method": "ties", "grid": {"ratio": [0.1]}}]}, "grid names ['ratio'], which ties does not have"),
        (
            {"methods": [{"method": "pcb", "grid": {"ratio": [0.05, 0.1, 0.2], "lambda": [1.0, 1.5, 2.0]}}], "budget": 8},
            "has 9 points, more than the budget of 8",
        ),
        ({"methods": ["ties", "ties"]}, "labels ['ties'] repeat"),
        ({"methods": [{"method": "ties", "grid": {"density": [0.1, 1.5]}}]}, "density"),
        ({"bounds": [1.2, 2.0]}, "key 'tune.bounds'"),
        ({"budgte": 3}, "unknown key 'tune.budgte'"),
    ],
)
def test_bad_tune_settings_name_the_key(tune, message):
    data = _data(PAPER_ZOO)
    data["tune"] = tune
    with pytest.raises(MergeInputError) as err:
        parse_tune_config(data, source="tune.yml")
    assert message in str(err.value) and str(err.value).startswith("tune.yml")


def test_methods_are_named_under_tune_not_at_the_top():
    data = {**_data(PAPER_ZOO), "merge_method": "ties"}
    with pytest.raises(MergeInputError, match="key 'merge_method' has no meaning in a tune config"):
        parse_tune_config(data)


def test_the_winner_is_chosen_on_validation_and_finalists_are_distinct():
    from pipeline.search_state import CandidateScore
    from pipeline.tuning import GridScore, LeaderboardRow, crown, finalists

    def row(name, validation, test):
        return LeaderboardRow(
            method=name, merge_method="ties", parameters={}, lambdas=[1.0], validation=validation, search_fitness=validation, test=test,
            test_stderr=None, test_scores={}, default_setting={}, evaluations=1, grid_points=1, grid_best={}, grid_fitness=0.0,
            chosen_from="grid", rescored=1, stopped=None,
        )  # fmt: skip

    rows = crown([row("a", 0.5, 0.9), row("b", 0.6, 0.1), row("c", 0.6, 0.2)])
    assert [r.winner for r in rows] == [False, True, False]  # never the test split; ties: the first listed

    method = parse_tune_config(_data(PAPER_ZOO)).tune.methods[0]
    score = lambda lam, fit: CandidateScore(lambdas=[lam, lam], scores={"a": fit}, fitness=fit, split="validation", build_seconds=0, eval_seconds=0, worker="w")  # noqa: E731
    grid = [
        GridScore(setting={"lambda": lam}, components_key="k", components_folder="f", score=score(lam, fit))
        for lam, fit in [(0.4, 0.5), (0.5, 0.5), (1.0, 0.7)]
    ]
    top = finalists(method, grid, None, grid[2], 2)
    assert [f.lambdas for f in top] == [[1.0, 1.0], [0.4, 0.4]]  # ties in fitness: the default λ 0.4 first


# ---------------------------------------------------------------- the flow, end to end


@pytest.fixture(scope="module")
def tuned(micro_zoo, prefect_harness):
    from flows.tune import tune_flow

    config = parse_tune_config(_data(micro_zoo), source="test")
    return config, tune_flow(config)


def test_every_method_spends_the_same_budget_and_only_choices_see_the_test_split(tuned):
    config, outcome = tuned
    assert outcome.finished and [r.method for r in outcome.leaderboard] == ["task_arithmetic", "pcb (release)"]
    for row in outcome.leaderboard:
        stages = [(e.stage, e.split) for e in outcome.history if e.method == row.method]
        assert row.evaluations == BUDGET == stages.count(("grid", "validation")) + stages.count(("search", "validation"))
        assert stages.count(("rescore", "validation")) == row.rescored == 2
        assert [s for s in stages if s[1] == "test"] == [("test", "test"), ("default", "test")]  # the choice, and the default for the report
        assert row.test_scores and 0 <= row.test <= 1 and row.default_test is not None
    pcb = outcome.leaderboard[1]
    assert set(pcb.parameters) == {"ratio"} and len(pcb.lambdas) == 2
    assert pcb.default_setting == {"ratio": 0.1, "lambda": 1.0}
    winner = max(outcome.leaderboard, key=lambda r: r.validation)
    assert outcome.winner == winner.method and [r.winner for r in outcome.leaderboard].count(True) == 1


def test_leaderboard_is_a_prefect_and_an_mlflow_artifact_and_the_winner_is_registered(tuned, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipeline.registry import read_lineage
    from pipeline.tracking import client

    _, outcome = tuned
    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tune-leaderboard"])))
    assert artifacts and artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert [r["method"] for r in table] == [r.method for r in outcome.leaderboard]

    mlflow_client = client()
    names = {a.path for a in mlflow_client.list_artifacts(outcome.run_id, "tune")}
    assert {"tune/leaderboard.md", "tune/leaderboard.json"} <= names
    saved = json.loads(open(mlflow_client.download_artifacts(outcome.run_id, "tune/leaderboard.json", str(tmp_path))).read())
    assert [r["test"] for r in saved] == [r.test for r in outcome.leaderboard]
    run = mlflow_client.get_run(outcome.run_id)
    assert run.data.tags["pcbmerge.tune.winner"] == outcome.winner and "pcb-release.test" in run.data.metrics
    children = mlflow_client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert len(children) == sum(r.evaluations + r.rescored for r in outcome.leaderboard)

    assert outcome.model_uri == "models:/tuned/1"
    lineage = read_lineage(outcome.model_uri)
    winner = next(r for r in outcome.leaderboard if r.winner)
    assert lineage["tune"]["method"] == outcome.winner and lineage["lambdas"] == winner.lambdas
    assert lineage["method"] == winner.merge_method


def test_a_paused_tuning_resumes_where_it_stopped(tuned, micro_zoo, prefect_harness, tmp_path, capsys):
    """Paused after two rounds (task arithmetic's grid and first CMA-ES round), resumed: the same leaderboard,
    and the resumed run does not run the finished grid again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from pcbmerge.cli import main

    _, straight = tuned
    path = tmp_path / "tune.yml"
    path.write_text(yaml.safe_dump(_data(micro_zoo)))
    assert main(["tune", str(path), "--stop-after-rounds", "2", "--json"]) == 0
    paused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert paused["finished"] is False and paused["model"] is None

    assert main(["tune", str(path), "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["winner"] == straight.winner and resumed["model"] == straight.model_uri
    assert [(r["method"], r["lambdas"], r["validation"], r["test"]) for r in resumed["leaderboard"]] == [
        (r.method, r.lambdas, r.validation, r.test) for r in straight.leaderboard
    ]
    with get_client(sync_client=True) as prefect_client:
        last = prefect_client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)[0]
        runs = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[last.id])))
    names = {r.name for r in runs if r.name.startswith("candidate")}
    assert not any("task_arithmetic grid" in n or "task_arithmetic r0." in n for n in names)
    assert any("task_arithmetic r1." in n for n in names) and any("pcb (release) grid" in n for n in names)


# ---------------------------------------------------------------- the search spends its budget


def test_a_search_with_budget_12_spends_it_and_says_why_it_stopped(micro_zoo, prefect_harness, tmp_path, capsys):
    """Four experts (population 8), 4 validation examples a task: the coarse fitness that used to stop the
    search after its first round. Now it runs 8 + 4 candidates and reports the budget as the reason."""
    from pcbmerge.cli import main
    from pipeline.tracking import client

    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(micro_zoo.base),
        "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks],
        "evaluation": {"tasks": micro_zoo.tasks, "include_path": str(micro_zoo.task_dir), "limit": 4, "split": "test"},
        "search": {"budget": 12, "seed": 0},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["evaluations"] >= 12 or summary["stopped"] not in (None, "flat")
    assert summary["evaluations"] == 12 and summary["stopped"] == "budget" and summary["rounds"] == 2
    runs = client().search_runs([client().get_experiment_by_name("pcbmerge").experiment_id], order_by=["attributes.start_time DESC"])
    search_run = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)  # not a candidate's nested run
    assert search_run.data.tags["pcbmerge.search.stopped"] == "budget"


# ---------------------------------------------------------------- evaluation options


def test_limit_at_or_above_the_split_is_no_limit_and_dtype_and_chat_options_are_keyed(micro_zoo, tmp_path):
    import torch

    from pipeline.evaluation import evaluate_model, load_model

    model, tokenizer = load_model(micro_zoo.experts["zoo_sort"], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    args = dict(include_path=micro_zoo.task_dir, split="validation", cache_dir=tmp_path)
    entries = lambda: len(glob.glob(str(tmp_path / "*.json")))  # noqa: E731
    first = evaluate_model(model, tokenizer, ["zoo_sort"], limit=1000, **args)  # the split holds 32
    again = evaluate_model(model, tokenizer, ["zoo_sort"], **args)
    exact = evaluate_model(model, tokenizer, ["zoo_sort"], limit=32, **args)
    assert entries() == 1 and first == again == exact  # one request, scored once

    in_float32 = evaluate_model(model, tokenizer, ["zoo_sort"], dtype="float32", **args)
    assert next(model.parameters()).dtype == torch.float32 and entries() == 2
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = evaluate_model(model, tokenizer, ["zoo_sort"], dtype="float32", apply_chat_template=True, **args)
    assert entries() == 3 and 0 <= chat.scores["zoo_sort"].value <= 1 and in_float32.scores
    with pytest.raises(MergeInputError, match="unknown evaluation dtype 'float8'"):
        evaluate_model(model, tokenizer, ["zoo_sort"], dtype="float8", **args)


# ---------------------------------------------------------------- components at LLM scale


def _exact(config, lambdas):
    """θ_pre + Σ λ_i C_i by the streaming merge itself (float32), per tensor."""
    import torch

    from pcbcore.components import loader_for
    from pcbcore.executor import block_shape, merged_blocks
    from pcbcore.inputs import open_inputs

    config = config.with_lambdas(lambdas)
    inputs = open_inputs(config)
    out = {}
    for info, rows, merged in merged_blocks(config, loader_for(config, inputs, torch.device("cpu"))):
        tensor = out.setdefault(info.name, torch.empty(info.shape))
        (tensor if rows is None else tensor[rows[0] : rows[1]]).copy_(merged.reshape(block_shape(info, rows)))
    inputs.close()
    return out


@pytest.mark.parametrize(
    "method, parameters, form",
    [
        ("ties", {"density": 0.2}, "stored"),
        ("pcb", {"ratio": 0.1}, "stored"),
        ("pcb", {"ratio": 0.2, "variant": "release"}, "stored"),
        ("task_arithmetic", {}, "recompute"),  # C_i = τ_i: nothing worth storing
        ("dare_ties", {"density": 0.9}, "recompute"),  # nearly dense: over the budget
    ],
)
def test_components_fit_the_budget_and_build_the_merge(tiny_zoo, tmp_path, method, parameters, form):
    """Sparse bf16 components (or none) cost ≤ 0.625 bytes per parameter per model on disk, and a candidate
    built from them is the merge itself, up to bf16 rounding of the components."""
    import torch

    from pcbcore.components import STORED_BYTES_PER_MODEL, StoredComponents, compute_components
    from pcbcore.config import parse_merge_config

    base, models = tiny_zoo
    data = {"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models], "parameters": parameters}
    config = parse_merge_config(data)
    stored = StoredComponents(compute_components(config, tmp_path / "c", device="cpu"), device="cpu")
    params = sum(t.numel() for name, t in stored.state_dict([0.0] * 3).items() if name in stored.names)
    assert stored.form == form and stored.stored_bytes <= STORED_BYTES_PER_MODEL * 3 * params
    lambdas = [1.3, 0.7, 1.1]
    built, exact, plain = stored.state_dict(lambdas, dtype=torch.float32), _exact(config, lambdas), _exact(config, [0.0] * 3)
    for name in stored.names:
        moved = (exact[name] - plain[name]).abs().max()
        assert (built[name] - exact[name]).abs().max() <= 2**-8 * moved + 1e-6, name


def test_a_tuned_winner_with_a_union_vocabulary_and_a_lora_is_the_merge_of_its_choice(micro_zoo, prefect_harness, tmp_path):
    """`tokenizer_source: union` and a `model+lora` model through the tuner: the winner's folder is `pcbmerge
    merge` of the config with the winner's setting and λ (tokenizer files, vocab_size and embeddings equal)."""
    import torch
    from builders import save_lora_adapter, save_with_added_tokens
    from safetensors.torch import load_file

    from flows.tune import tune_flow
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_to_folder

    first, second = (micro_zoo.experts[t] for t in micro_zoo.tasks[:2])
    extra = save_with_added_tokens(second, tmp_path / "extra", ["<y1>", "<y2>", "<y3>"], seed=4)
    lora = save_lora_adapter(first, tmp_path / "lora", seed=7)
    data = _data(micro_zoo, methods=[{"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}}], budget=3, limit=2, top_k=1, report_defaults=False)
    data.update(models=[{"model": f"{first}+{lora}"}, {"model": str(extra)}], tokenizer_source="union", register_as=None)
    data["evaluation"]["limit"] = 2
    outcome = tune_flow(parse_tune_config(data, source="test"))
    assert outcome.finished and outcome.winner == "task_arithmetic"

    winner = outcome.leaderboard[0]
    models = [{"model": m["model"], "parameters": {"lambda": x}} for m, x in zip(data["models"], winner.lambdas)]
    merge = {
        "merge_method": "task_arithmetic",
        "base_model": data["base_model"],
        "models": models,
        "parameters": winner.parameters,
        "tokenizer_source": "union",
    }
    written = tmp_path / "direct"
    merge_to_folder(parse_merge_config(merge), written, device="cpu")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (written / name).read_text() == open(f"{outcome.folder}/{name}").read(), name
    ours, theirs = load_file(f"{outcome.folder}/model.safetensors"), load_file(written / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((written / "config.json").read_text())["vocab_size"] == theirs["model.embed_tokens.weight"].shape[0]
