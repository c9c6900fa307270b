"""Benchmark of the CMA-ES coefficient search (issue 5 targets) on a zoo.

1. Candidate build vs evaluation time: components loaded once, then for several λ vectors the in-memory
   build (θ_pre + Σ λ_i C_i into a loaded model) and one uncached lm-eval evaluation on the validation split.
   Target: build < 5 % of evaluation.
2. Search vs fixed λ: every fixed-λ merge of `pcbmerge demo` (its `DEMO_MERGES`, one global λ each) merged and scored on the test split,
   then `pcbmerge search` (PCB, release variant by default; CMA-ES on the validation split) and its final test score. Target: the
   search's mean test score beats the best fixed-λ method's.

    .venv/bin/python bench/search_bench.py --size demo --budget 24 --popsize 6 [--variant paper] [--ratio 0.1 0.2]

Writes `results.json` and `results.md` under `--workdir` (default bench/out/search).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["micro", "demo"], default="demo")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/search"))
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--popsize", type=int, default=6)
    parser.add_argument("--sigma0", type=float, default=0.2)
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.1], help="PCB kept fraction(s) for the search (several: a grid)")
    parser.add_argument("--variant", choices=["paper", "release"], default="release", help="PCB variant for the search")
    parser.add_argument("--bounds", type=float, nargs=2, default=[0.5, 1.5], metavar=("LO", "HI"))
    parser.add_argument("--tag", default="", help="suffix of the results files (several searches side by side)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (validation and test)")
    parser.add_argument("--repeats", type=int, default=5, help="λ vectors timed in part 1")
    args = parser.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PCBMERGE_HOME", str(work / "home"))
    os.environ.setdefault("PREFECT_HOME", str(work / "home" / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(work / "mpl"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

    from pipeline.zoo import build_zoo, load_zoo

    zoo_dir = work / f"zoo-{args.size}"
    if not (zoo_dir / "zoo.json").is_file():
        started = time.perf_counter()
        build_zoo(zoo_dir, size=args.size, seed=0)
        print(f"built the {args.size} zoo in {time.perf_counter() - started:.0f}s", flush=True)
    zoo = load_zoo(zoo_dir)
    results = {"size": args.size, "tasks": zoo.tasks, "limit": args.limit}
    results["timing"] = time_candidates(zoo, work, args)
    print(json.dumps(results["timing"], indent=2), flush=True)
    results["fixed"] = fixed_methods(zoo, work, args)
    results["search"] = search(zoo, work, args)
    (work / f"results{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    (work / f"results{args.tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def time_candidates(zoo, work: Path, args) -> dict:
    """Part 1: build vs evaluation time of single candidates (no cache: a fresh cache folder each)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pcbcore.components import StoredComponents, compute_components
    from pcbcore.config import parse_merge_config
    from pipeline.candidates import build_candidate
    from pipeline.evaluation import evaluate_model

    data = {
        "merge_method": "pcb",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks],
        "parameters": {"ratio": args.ratio[0]},
    }
    folder = work / "components-timing"
    started = time.perf_counter()
    compute_components(parse_merge_config(data), folder, device="cpu", overwrite=True)
    compute_seconds = time.perf_counter() - started
    started = time.perf_counter()
    components = StoredComponents(folder, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    load_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    builds, evals = [], []
    for _ in range(args.repeats):
        lambdas = rng.uniform(0.5, 1.5, len(zoo.tasks)).tolist()
        started = time.perf_counter()
        build_candidate(model, components, lambdas)
        builds.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            evaluate_model(model, tokenizer, zoo.tasks, include_path=zoo.task_dir, split="validation", limit=args.limit, device="cpu", cache_dir=Path(cache))
            evals.append(time.perf_counter() - started)
    build, evaluate = float(np.median(builds)), float(np.median(evals))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "compute_components_seconds": round(compute_seconds, 3),
        "load_once_seconds": round(load_seconds, 3),
        "build_seconds_median": round(build, 5),
        "eval_seconds_median": round(evaluate, 3),
        "build_share_percent": round(100 * build / evaluate, 3),
        "target_met": build < 0.05 * evaluate,
    }


def fixed_methods(zoo, work: Path, args) -> dict:
    """Part 2a: every fixed-λ method, merged to disk and scored on both splits."""
    import yaml

    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_to_folder
    from pipeline.demo_configs import DEMO_MERGES
    from pipeline.evaluation import evaluate_path

    out = {}
    for label, method, params in DEMO_MERGES:
        data = {"merge_method": method, "base_model": str(zoo.base), "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks], "parameters": params}
        folder = work / "fixed" / label.replace(" ", "-").replace("(", "").replace(")", "")
        merge_to_folder(parse_merge_config(data), folder, overwrite=True, config_text=yaml.safe_dump(data))
        row = {}
        for split in ("validation", "test"):
            result = evaluate_path(
                folder, zoo.tasks, include_path=zoo.task_dir, split=split, limit=args.limit, device="cpu", cache_dir=work / "home" / "cache" / "eval"
            )
            row[split] = {t: s.value for t, s in result.scores.items()}
            row[f"{split}_mean"] = result.mean()
        out[label] = row
        print(f"{label:<16} validation {row['validation_mean']:.4f}  test {row['test_mean']:.4f}", flush=True)
    return out


def search(zoo, work: Path, args) -> dict:
    """Part 2b: `pcbmerge search` with PCB (`--variant`) on the validation split."""
    from infra.task_runners import run_search
    from pipeline.search_config import parse_search_config

    config = parse_search_config(
        {
            "merge_method": "pcb",
            "base_model": str(zoo.base),
            "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks],
            "parameters": {"ratio": args.ratio[0], "variant": args.variant, **({"clip_quantile": 0.01} if args.variant == "release" else {})},
            "evaluation": {"tasks": zoo.tasks, "include_path": str(zoo.task_dir), "split": "test", "limit": args.limit},
            "search": {
                "budget": args.budget,
                "popsize": args.popsize,
                "sigma0": args.sigma0,
                "seed": 0,
                "workers": args.workers,
                "bounds": args.bounds,
                **({"ratio": args.ratio} if len(args.ratio) > 1 else {}),
            },
            "register_as": f"bench-search-{args.size}{args.tag}",
        },
        source="bench",
    )
    started = time.perf_counter()
    outcome = run_search(config)
    wall = time.perf_counter() - started
    test_mean = sum(outcome.test_scores.values()) / len(outcome.test_scores)
    return {
        "settings": {"variant": args.variant, "ratio": args.ratio, "bounds": args.bounds, "budget": args.budget, "popsize": args.popsize},
        "best_ratio": outcome.ratio,
        "lambdas": outcome.lambdas,
        "best_validation_fitness": outcome.best_fitness,
        "start_validation_fitness": outcome.start_fitness,
        "evaluations": outcome.evaluations,
        "rounds": outcome.rounds,
        "build_seconds_total": outcome.build_seconds,
        "eval_seconds_total": outcome.eval_seconds,
        "build_share_percent": round(100 * outcome.build_seconds / max(outcome.eval_seconds, 1e-9), 3),
        "wall_seconds": round(wall, 1),
        "test": outcome.test_scores,
        "test_mean": test_mean,
        "model": outcome.model_uri,
    }


def markdown(results: dict) -> str:
    timing, fixed, found = results["timing"], results["fixed"], results.get("search")
    lines = [
        f"# Search benchmark ({results['size']} zoo, limit {results['limit']})",
        "",
        f"Candidate build (median) {timing['build_seconds_median'] * 1000:.1f} ms vs evaluation {timing['eval_seconds_median']:.2f} s: "
        f"{timing['build_share_percent']:.2f}% (target < 5%: {'met' if timing['target_met'] else 'NOT met'}); "
        f"components computed once in {timing['compute_components_seconds']:.1f}s, loaded in {timing['load_once_seconds']:.1f}s.",
        "",
        "| method | λ | validation mean | test mean |",
        "|---|---|---|---|",
    ]
    for label, row in fixed.items():
        lines.append(f"| {label} | fixed | {row['validation_mean']:.4f} | {row['test_mean']:.4f} |")
    if found:
        lams = ", ".join(f"{x:.3f}" for x in found["lambdas"])
        settings = found["settings"]
        grid = f"ratio {found['best_ratio'] or settings['ratio'][0]}" + (f" of {settings['ratio']}" if len(settings["ratio"]) > 1 else "")
        lines.append(
            f"| pcb {settings['variant']} + CMA-ES ({grid}, bounds {settings['bounds']}, {found['evaluations']} evaluations, {found['rounds']} rounds) | [{lams}] | "
            f"{found['best_validation_fitness']:.4f} | {found['test_mean']:.4f} |"
        )
        best_label = max(fixed, key=lambda k: fixed[k]["test_mean"])
        lines += [
            "",
            f"Best fixed-λ method on test: {best_label} ({fixed[best_label]['test_mean']:.4f}); search: "
            f"{found['test_mean']:.4f} ({found['test_mean'] - fixed[best_label]['test_mean']:+.4f}). "
            f"Search wall time {found['wall_seconds']:.0f}s; building {found['build_share_percent']:.2f}% of evaluating.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
