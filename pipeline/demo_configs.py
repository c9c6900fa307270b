"""The demo's merges (`pcbmerge demo`, `bench/`): the fixed-setting rows and the searched row, as pipeline
configs on a zoo."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig, parse_pipeline_config
from pipeline.search_config import SearchPipelineConfig, parse_search_config
from pipeline.tune_config import TunePipelineConfig, parse_tune_config

# (label, merge_method, parameters). One global λ per method, the usual values from each paper for a
# handful of tasks; a CMA-ES search over per-model λ on validation data is the search flow's job.
DEMO_MERGES = [
    ("task_arithmetic", "task_arithmetic", {"lambda": 0.4}),
    ("ties", "ties", {"density": 0.2, "lambda": 1.0}),
    ("pcb (paper)", "pcb", {"ratio": 0.1, "variant": "paper"}),
    ("pcb (release)", "pcb", {"ratio": 0.1, "variant": "release", "clip_quantile": 0.01}),
]


# The demo's search row (`pcbmerge demo`): PCB (release variant, the demo's better fixed PCB) with per-model
# λ searched by CMA-ES on the validation split; a short search (two rounds) so the demo stays a few minutes
# on two cores. bench/search_bench.py measured the longer search (24 candidates) on the demo zoo.
DEMO_SEARCH = {"budget": 12, "popsize": 6, "sigma0": 0.2, "seed": 0, "workers": 2}


def demo_merge_config(zoo, work: Path, size: str, label: str, method: str, params: dict, limit: int | None) -> PipelineConfig:
    """One fixed-setting row: merge, score base, experts and merge on the test split, register."""
    slug = label.replace(" (", "-").replace(")", "").replace("_", "-")
    return parse_pipeline_config(
        {
            "merge_method": method,
            "base_model": str(zoo.base),
            "models": [{"model": str(zoo.experts[task])} for task in zoo.tasks],
            "parameters": params,
            "evaluation": {
                "tasks": zoo.tasks,
                "include_path": str(zoo.task_dir),
                "split": "test",
                "limit": limit,
                "baselines": True,
            },
            "register_as": f"demo-{size}-{slug}",
            "experiment": "pcbmerge-demo",
            "output": str(work / f"merged-{size}" / slug),
            "overwrite": True,
            "name": f"demo {label}",
        },
        source=f"demo:{label}",
    )


def demo_search_config(zoo, work: Path, size: str, limit: int | None) -> SearchPipelineConfig:
    """The searched row: PCB (release variant, the demo's better fixed PCB) with per-model λ by CMA-ES."""
    return parse_search_config(
        {
            "merge_method": "pcb",
            "base_model": str(zoo.base),
            "models": [{"model": str(zoo.experts[task])} for task in zoo.tasks],
            "parameters": {"ratio": 0.1, "variant": "release", "clip_quantile": 0.01},
            "evaluation": {"tasks": zoo.tasks, "include_path": str(zoo.task_dir), "split": "test", "limit": limit},
            "search": DEMO_SEARCH,
            "register_as": f"demo-{size}-pcb-cma-es",
            "experiment": "pcbmerge-demo",
            "output": str(work / f"merged-{size}" / "pcb-cma-es"),
            "overwrite": True,
            "name": "demo pcb + CMA-ES",
        },
        source="demo:pcb (release) + CMA-ES",
    )


# The demo's tuner (`pcbmerge demo`): every default method with its default grid and one budget each; the
# search slice is the first half of each validation split, the re-scoring all of it. Sized to take a few
# minutes on two cores for the demo zoo (its validation splits hold 100 examples a task).
DEMO_TUNE = {"budget": 36, "limit": 50, "top_k": 3, "seed": 0, "report_defaults": True, "workers": 2}


def demo_tune_config(zoo, work: Path, size: str, limit: int | None, budget: int | None = None) -> TunePipelineConfig:
    """The tuned comparison: each method's default setting and its tuned choice on the test split."""
    tune = {**DEMO_TUNE, **({"budget": budget} if budget else {})}
    if size == "micro":  # 32 validation examples a task
        tune["limit"] = 16
    return parse_tune_config(
        {
            "base_model": str(zoo.base),
            "models": [{"model": str(zoo.experts[task])} for task in zoo.tasks],
            "evaluation": {"tasks": zoo.tasks, "include_path": str(zoo.task_dir), "split": "test", "limit": limit, "baselines": True},
            "tune": tune,
            "register_as": f"demo-{size}-tuned",
            "experiment": "pcbmerge-demo",
            "output": str(work / f"merged-{size}" / "tuned-winner"),
            "overwrite": True,
            "name": "demo tuner",
        },
        source="demo:tune",
    )
