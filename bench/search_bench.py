"""Benchmark of the CMA-ES coefficient search (issue 5 targets) on a zoo.

1. Candidate build vs evaluation time: components loaded once, then for several λ vectors the in-memory
   build (θ_pre + Σ λ_i C_i into a loaded model) and one uncached lm-eval evaluation on the validation split.
   Target: build < 5 % of evaluation.
2. Search vs fixed λ: every fixed-λ merge of `pcbmerge demo` (its `DEMO_MERGES`, one global λ each) merged and scored on the test split,
   then `pcbmerge search` (PCB, release variant by default; CMA-ES on the validation split) and its final test score. Target: the
   search's mean test score beats the best fixed-λ method's.

    .venv/bin/python bench/search_bench.py --size demo --budget 24 --popsize 6 [--variant paper] [--ratio 0.1 0.2]

Writes `results.json` and `results.md` under `--workdir` (default bench/out/search).

3. Components at LLM scale (`--components-size 477M`, on its own): a synthetic 4-expert zoo of that size
   (bench/merge_bench.py's Llama shapes, bf16), and per method the stored components' bytes per merged
   parameter on disk, the time to compute them, a candidate's build time and the resident memory it adds
   beyond the model (a fresh process per method, the model's tensors allocated first), and the built
   weights' error against the exact streaming merge. Target: ≤ 2.5 bytes per parameter for 4 experts.

    .venv/bin/python bench/search_bench.py --components-size 477M [--workdir bench/out/search]

Writes `components.json` and `components.md`.
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
    parser.add_argument("--components-size", default=None, metavar="SIZE", help="part 3 only: components of a 4-expert zoo of SIZE (e.g. 477M)")
    parser.add_argument("--components-worker", default=None, help=argparse.SUPPRESS)  # one method's build, in its own process
    args = parser.parse_args()
    if args.components_worker:
        print(json.dumps(components_worker(Path(args.components_worker))))
        return 0
    if args.components_size:
        return components_at_scale(args)

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


# ---------------------------------------------------------------- part 3: components at LLM scale

N_EXPERTS = 4
SCALE_METHODS = [
    ("ties d=0.2", "ties", {"density": 0.2}),
    ("dare_ties d=0.5", "dare_ties", {"density": 0.5}),
    ("pcb paper r=0.1", "pcb", {"ratio": 0.1, "variant": "paper"}),
    ("pcb release r=0.2", "pcb", {"ratio": 0.2, "variant": "release"}),
    ("task_arithmetic", "task_arithmetic", {}),
]
LAMBDAS = [1.3, 0.7, 1.1, 0.9]


def components_at_scale(args) -> int:
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import merge_bench

    from pcbcore.components import StoredComponents, compute_components
    from pcbcore.config import parse_merge_config

    work = args.workdir.resolve()
    merge_bench.N_FINETUNES = N_EXPERTS  # four experts (merge_bench's zoo has three)
    zoo = work / f"zoo-{args.components_size}-x{N_EXPERTS}"
    cfg = merge_bench.build_zoo(zoo, merge_bench.parse_size(args.components_size), 2 * 1024**3, seed=0)
    dirs = merge_bench.model_dirs(zoo)
    rows = []
    for label, method, params in SCALE_METHODS:
        data = {"merge_method": method, "base_model": str(dirs[0]), "models": [{"model": str(d)} for d in dirs[1:]], "parameters": params}
        folder = work / "components-scale" / label.replace(" ", "-").replace("=", "")
        started = time.perf_counter()
        compute_components(parse_merge_config(data), folder, device="cpu", overwrite=True)
        compute_seconds = time.perf_counter() - started
        stored = StoredComponents(folder, device="cpu")
        parameters = sum(_numel(stored.shapes[name]) for name in stored.names)
        spec = folder / "bench.json"
        spec.write_text(json.dumps({"config": data, "lambdas": LAMBDAS, "exact": stored.form == "stored"}))
        print(f"[components] {label}: {stored.form}, {stored.stored_bytes / parameters:.3f} bytes/parameter, computed in {compute_seconds:.1f}s", flush=True)
        out = subprocess.run([sys.executable, __file__, "--components-worker", str(folder)], capture_output=True, text=True, check=True)
        worker = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "method": label,
                "form": stored.form,
                "parameters": parameters,
                "bytes_per_parameter": round(stored.stored_bytes / parameters, 4),
                "compute_seconds": round(compute_seconds, 1),
                **worker,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    results = {"size": args.components_size, "experts": N_EXPERTS, "config": cfg, "rows": rows}
    (work / f"components{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    (work / f"components{args.tag}.md").write_text(components_markdown(results))
    print(components_markdown(results))
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    """This process's resident memory now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def components_worker(folder: Path) -> dict:
    """In a fresh process: the model's tensors first (what a worker holds anyway), then one candidate built
    into them; the peak memory it added, its build time, and its error against the exact merge."""
    import torch

    from pcbcore.components import StoredComponents, loader_for
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import block_shape, merged_blocks
    from pcbcore.inputs import open_inputs

    spec = json.loads((folder / "bench.json").read_text())
    stored = StoredComponents(folder, device="cpu")
    model = {name: torch.empty(stored.shapes[name], dtype=dtype) for name, dtype in stored.out_dtypes.items()}
    for name in model:
        model[name].zero_()  # touch every page: the model is resident before the baseline
    baseline, now = _peak_rss(), _current_rss()
    builds, highest = [], now
    for _ in range(2):
        started = time.perf_counter()
        for name, tensor in stored.tensors(spec["lambdas"]):
            highest = max(highest, _current_rss())  # with the tensor just built still held
            if name in model:
                model[name].copy_(tensor)
        builds.append(time.perf_counter() - started)
    added = max(_peak_rss() - baseline, highest - now)
    parameters = sum(t.numel() for t in model.values())
    result = {"build_seconds": round(min(builds), 2), "added_memory_bytes_per_parameter": round(added / parameters, 4)}
    if spec["exact"]:
        config = parse_merge_config(spec["config"]).with_lambdas(spec["lambdas"])
        inputs = open_inputs(config)
        differ, worst, total, ours, rounding = 0, 0.0, 0, 0.0, 0.0
        for info, rows, merged in merged_blocks(config, loader_for(config, inputs, torch.device("cpu"))):
            built = model[info.name] if rows is None else model[info.name][rows[0] : rows[1]]
            exact = merged.reshape(block_shape(info, rows))  # float32: the merge before its output rounding
            rounded = exact.to(built.dtype)  # what the exact merge writes
            differ += int((built != rounded).sum())
            worst = max(worst, float((built.float() - rounded.float()).abs().max()))
            ours += float((built.float() - exact).abs().double().sum())
            rounding += float((rounded.float() - exact).abs().double().sum())
            total += exact.numel()
        inputs.close()
        result.update(
            {
                "bf16_entries_differing_percent": round(100 * differ / total, 4),
                "max_abs_difference": worst,  # against the exact merge's own bf16 output
                "mean_abs_error": ours / total,  # against the float32 merge
                "mean_abs_error_of_exact_bf16": rounding / total,  # the output rounding every bf16 merge has
            }
        )
    return result


def components_markdown(results: dict) -> str:
    lines = [
        f"Components of a {results['experts']}-expert search at {results['size']} parameters per model (bf16 checkpoints); candidate λ = {LAMBDAS}.",
        "",
        "| method | form | bytes/param on disk | compute s | build s | added memory bytes/param | outputs differing from the exact merge (bf16) "
        "| max abs difference | mean abs error vs fp32 merge (exact merge's own bf16 rounding) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        stored = r["form"] == "stored"
        differ = f"{r['bf16_entries_differing_percent']} %" if stored else "0 (the merge itself)"
        error = f"{r['mean_abs_error']:.2e} ({r['mean_abs_error_of_exact_bf16']:.2e})" if stored else "—"
        lines.append(
            f"| {r['method']} | {r['form']} | {r['bytes_per_parameter']:.3f} | {r['compute_seconds']} | {r['build_seconds']} | "
            f"{r['added_memory_bytes_per_parameter']:.3f} | {differ} | {r.get('max_abs_difference', 0.0):.2e} | {error} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
