"""`evaluate_checkpoint`: lm-eval scores of a checkpoint folder, keyed on its content fingerprint.

The Prefect cache key is (fingerprint, tasks, split, limit, task files, lm-eval version), so a re-run skips
finished evaluations without loading the model; `pipeline.evaluation` keeps its own per-task cache
underneath, keyed on the loaded weights.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from pipeline.cache_keys import digest, task_files
from pipeline.config import EvaluationConfig
from pipeline.evaluation import LM_EVAL_VERSION, EvalResult, evaluate_path

EVAL_TIMEOUT_SECONDS = 4 * 3600


def _eval_cache_key(context, parameters) -> str:
    evaluation: EvaluationConfig = parameters["evaluation"]
    request = evaluation.model_dump(exclude={"batch_size", "baselines"}, exclude_defaults=True)  # new options at their defaults keep old keys
    return "eval-" + digest([parameters["fingerprint"], request, task_files(evaluation.include_path), LM_EVAL_VERSION])


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
        dtype=evaluation.dtype,
        apply_chat_template=evaluation.apply_chat_template,
        fewshot_as_multiturn=evaluation.fewshot_as_multiturn,
    )
