"""`evaluate_checkpoint`: lm-eval scores of a checkpoint folder, keyed on its content fingerprint.

The Prefect cache key is (fingerprint, tasks, split, limit, task files, lm-eval version), so a re-run skips
finished evaluations without loading the model; `pcbmerge.evaluation` keeps its own per-task cache
underneath, keyed on the loaded weights.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from pcbmerge.evaluation import LM_EVAL_VERSION, EvalResult, evaluate_path
from pcbmerge.pipeline_config import EvaluationConfig
from tasks._keys import digest

EVAL_TIMEOUT_SECONDS = 4 * 3600


def _task_files(include_path: str | None) -> list:
    if not include_path or not Path(include_path).is_dir():
        return []
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(include_path).rglob("*") if p.is_file())


def _eval_cache_key(context, parameters) -> str:
    evaluation: EvaluationConfig = parameters["evaluation"]
    request = evaluation.model_dump(exclude={"batch_size", "baselines"})
    return "eval-" + digest([parameters["fingerprint"], request, _task_files(evaluation.include_path), LM_EVAL_VERSION])


@task(
    cache_key_fn=_eval_cache_key,
    persist_result=True,
    timeout_seconds=EVAL_TIMEOUT_SECONDS,
    task_run_name="evaluate {label}",
)
def evaluate_checkpoint(label: str, folder: str, fingerprint: str, evaluation: EvaluationConfig, cache_dir: str, device: str) -> EvalResult:
    """Score the model in `folder` on the configured lm-eval tasks and split."""
    return evaluate_path(
        folder,
        list(evaluation.tasks),
        include_path=evaluation.include_path,
        split=evaluation.split,
        limit=evaluation.limit,
        device=device,
        batch_size=evaluation.batch_size,
        cache_dir=Path(cache_dir) / "eval",
    )
