"""Benchmarking through lm-eval-harness: offline, on in-memory models, with cached results.

`evaluate_model` scores a `transformers` model object that lives in memory (a merge candidate is never
written to disk) with `lm_eval.simple_evaluate` and lm-eval's HF wrapper. Tasks are any task lm-eval
knows plus the YAMLs under `include_path` (the zoo's `task_dir`). When every asked task is found under
`include_path`, lm-eval's ~10 s index of its built-in tasks is skipped.

Splits: `split="test"` scores what lm-eval would (a task's `test_split`; for built-in tasks without
labelled test data, their validation split); `split="validation"` points the loaded task's `test_split`
at its validation split before evaluating, so one task name serves the search (validation) and the final
report (test) without generating two YAMLs per task.

Precision and prompts: `dtype` casts the model before scoring (a bf16 checkpoint scored in float32: the
weights are the bf16 ones, the arithmetic is not); `apply_chat_template` and `fewshot_as_multiturn` are
lm-eval's options for instruction-tuned models.

Cache (`pipeline.result_cache`): one JSON file per (model, tokenizer, task, split, limit, few-shot, chat
options, lm-eval version) under `cache_dir`; a `limit` at or above the split's size is the same request as
no limit (the size is recorded the first time the task is run); a hit never calls the harness. A task's identity is its YAML text plus the bytes of its
local data files for tasks under `include_path`, and its name for built-in tasks (their version is
covered by the lm-eval version). HF datasets' Arrow cache is pointed into `cache_dir` too, so evaluation
writes nowhere else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from pcbcore.device import resolve_device
from pcbcore.errors import MergeInputError
from pipeline.environment import point_datasets_cache
from pipeline.fingerprints import model_content_hash, tokenizer_hash
from pipeline.result_cache import CACHE_SCHEMA, cache_folder, read_result, read_split_size, result_key, write_result, write_split_size
from pipeline.scores import EvalResult, TaskScore

log = logging.getLogger(__name__)

LM_EVAL_VERSION = importlib.metadata.version("lm_eval")
SPLITS = ("validation", "test")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    cache_dir: Path | None = None,
    num_fewshot: int | None = None,
    dtype: str | None = None,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool = True,
) -> EvalResult:
    """Score an in-memory causal LM on lm-eval tasks; cached per task. Moves `model` to `device` (and casts
    it to `dtype` unless that is None or "auto").

    `cache_dir` defaults to `load_settings().cache_dir / "eval"`.
    """
    names = _check_request(tasks, split, limit, num_fewshot, batch_size)
    include = _check_include_path(include_path)
    cast = _torch_dtype(dtype)
    if cast is not None:
        model.to(cast)
    cache = cache_folder(cache_dir)
    device = str(resolve_device(device))
    project = _project_tasks(include)
    base_key = {
        "schema": CACHE_SCHEMA,
        "model": model_content_hash(model),  # its dtype included: the same weights scored in float32 differ
        "tokenizer": tokenizer_hash(tokenizer),
        "split": split,
        "num_fewshot": num_fewshot,
        "lm_eval": LM_EVAL_VERSION,
    }
    if apply_chat_template:  # only then does multiturn mean anything; old entries keep their keys
        base_key["chat"] = {"apply_chat_template": apply_chat_template, "fewshot_as_multiturn": fewshot_as_multiturn}
    identities = {name: _task_identity(name, project) for name in names}
    keys = {name: result_key({**base_key, "limit": _effective_limit(cache, identities[name], split, limit)}, identities[name]) for name in names}
    scores = {name: read_result(cache, keys[name]) for name in names}
    missing = [name for name in names if scores[name] is None]
    if missing:
        log.info("evaluating %s on %s split (%s)", ", ".join(missing), split, "no limit" if limit is None else f"limit {limit}")
        chat = {"apply_chat_template": apply_chat_template, "fewshot_as_multiturn": fewshot_as_multiturn}
        fresh, sizes = _run_harness(model, tokenizer, missing, include, project, split, limit, device, batch_size, cache, num_fewshot, chat)
        for name, score in fresh.items():
            if name in sizes:
                write_split_size(cache, {**identities[name], "lm_eval": LM_EVAL_VERSION}, split, sizes[name])
            key = result_key({**base_key, "limit": _effective_limit(cache, identities[name], split, limit)}, identities[name])
            write_result(cache, key, score, LM_EVAL_VERSION)
            scores[name] = score
    else:
        log.info("all %d task scores came from the cache", len(names))
    return EvalResult(scores={name: scores[name] for name in names})


def evaluate_path(model_dir: str | Path, tasks: list[str], **kwargs: Any) -> EvalResult:
    """Load a checkpoint folder with transformers (no remote code) and call `evaluate_model` on it."""
    model, tokenizer = load_model(model_dir, dtype=kwargs.get("dtype"))
    return evaluate_model(model, tokenizer, tasks, **kwargs)


def load_model(model_dir: str | Path, dtype: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer from a folder (in `dtype`; None or "auto": the checkpoint's own), or
    `MergeInputError` saying why transformers cannot load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise MergeInputError(f"model folder {folder} does not exist or is not a folder.")
    cast = _torch_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **({"dtype": cast} if cast is not None else {}))
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise MergeInputError(f"transformers cannot load the model folder {folder}: {reason}") from exc
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- input checks


def _check_request(tasks: list[str], split: str, limit: int | None, num_fewshot: int | None, batch_size: int) -> list[str]:
    if isinstance(tasks, str):  # "a,b" as on the command line, rather than iterating its characters
        tasks = tasks.split(",")
    names = [task.strip() for task in tasks if task and task.strip()]
    if not names:
        raise MergeInputError("no task names given; pass at least one task, e.g. --tasks zoo_reverse.")
    if len(set(names)) != len(names):
        raise MergeInputError(f"task names repeat in {names}; name each task once.")
    if split not in SPLITS:
        raise MergeInputError(f"unknown split {split!r}; choose one of {list(SPLITS)}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise MergeInputError(f"limit must be a positive whole number of examples per task, got {limit!r}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise MergeInputError(f"num_fewshot must be 0 or more, got {num_fewshot}.")
    if batch_size <= 0:
        raise MergeInputError(f"batch_size must be positive, got {batch_size}.")
    return names


def _torch_dtype(dtype: str | None) -> Any:
    """The torch dtype to score in, or None to keep the model's own."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise MergeInputError(f"unknown evaluation dtype {dtype!r}; choose one of {list(DTYPES)}.")
    import torch

    return getattr(torch, dtype)


def _effective_limit(cache: Path, identity: dict[str, Any], split: str, limit: int | None) -> int | None:
    """`limit`, or None when it covers the whole split (its size known from an earlier run): the same
    examples are then one request, whichever way it was asked."""
    if limit is None:
        return None
    size = read_split_size(cache, {**identity, "lm_eval": LM_EVAL_VERSION}, split)
    return None if size is not None and limit >= size else limit


def _check_include_path(include_path: str | Path | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser().resolve()
    if not path.is_dir():
        raise MergeInputError(f"task folder {path} (include path) does not exist or is not a folder.")
    return path


# ---------------------------------------------------------------- tasks and their identity


_manager_lock = threading.Lock()


@lru_cache(maxsize=8)
def _task_manager(include: Path | None, include_defaults: bool, listing: tuple) -> Any:
    """A cached TaskManager; `listing` (the YAML files and their mtimes) invalidates it when files change."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None, include_defaults=include_defaults)


def _manager(include: Path | None, include_defaults: bool) -> Any:
    listing: tuple = ()
    if include is not None:
        listing = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in include.rglob("*.y*ml")))
    with _manager_lock:
        return _task_manager(include, include_defaults, listing)


def _project_tasks(include: Path | None) -> dict[str, Any]:
    """Index entries of the tasks defined under `include` (name -> lm-eval index entry)."""
    if include is None:
        return {}
    return dict(_manager(include, False).task_index)


def _task_identity(name: str, project: dict[str, Any]) -> dict[str, Any]:
    entry = project.get(name)
    if entry is None or entry.yaml_path is None:
        return {"builtin": name}
    digest = hashlib.sha256(Path(entry.yaml_path).read_bytes())
    for data_file in _local_data_files((entry.cfg or {}).get("dataset_kwargs", {})):
        digest.update(data_file.encode())
        digest.update(Path(data_file).read_bytes())
    return {"project": name, "content": digest.hexdigest()}


def _local_data_files(dataset_kwargs: dict) -> list[str]:
    """The existing local files named in `dataset_kwargs.data_files` (a path, a list, or a split dict)."""
    files = dataset_kwargs.get("data_files") if isinstance(dataset_kwargs, dict) else None
    if isinstance(files, dict):
        files = [f for value in files.values() for f in (value if isinstance(value, list) else [value])]
    elif isinstance(files, str):
        files = [files]
    return sorted(str(f) for f in files or [] if isinstance(f, str) and os.path.isfile(f))


def _unknown_tasks_error(unknown: list[str], manager: Any, project: dict[str, Any], include: Path | None) -> MergeInputError:
    import difflib

    known = manager.all_tasks
    near = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3)})
    hint = f" Close matches: {near}." if near else ""
    folder = f"the task folder {include} defines {sorted(project) or 'no tasks'} and " if include is not None else ""
    return MergeInputError(
        f"unknown task(s) {unknown}; {folder}lm-eval has {len(known)} tasks in all (list them with `lm-eval ls tasks`; "
        f"tasks of your own: give their folder as include_path).{hint}"
    )


# ---------------------------------------------------------------- the harness


def _run_harness(
    model: Any,
    tokenizer: Any,
    names: list[str],
    include: Path | None,
    project: dict[str, Any],
    split: str,
    limit: int | None,
    device: str,
    batch_size: int,
    cache: Path,
    num_fewshot: int | None,
    chat: dict[str, Any] | None = None,
) -> tuple[dict[str, TaskScore], dict[str, int]]:
    """The scores of `names`, and the size of each task's split (examples before `limit`)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    point_datasets_cache(cache / "hf_datasets")
    only_project = all(name in project for name in names)
    manager = _manager(include, include_defaults=not only_project)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise _unknown_tasks_error(unknown, manager, project, include)
    try:
        task_dict = get_task_dict(names, manager)
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise MergeInputError(f"the data of task(s) {names} could not be loaded (offline?): {exc}") from exc
    chosen = [_choose_split(name, task, split) for name, task in task_dict.items()]
    sizes = {name: len(task.eval_docs) for name, task in task_dict.items() if isinstance(name, str) and hasattr(task, "eval_docs")}

    model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=chosen,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
        **(chat or {}),
    )
    return {name: _headline(name, output) for name in names}, sizes


def _choose_split(name: Any, task: Any, split: str) -> Any:
    """Point a loaded task at the asked split (see the module docstring); groups keep lm-eval's choice."""
    from lm_eval.api.task import Task

    if not isinstance(task, Task):
        if split != "test":
            raise MergeInputError(f"task group {name} can only be evaluated on lm-eval's default split, not {split!r}.")
        return name if isinstance(name, str) else getattr(name, "group_name", str(name))
    config = task.config
    if split == "validation":
        if not config.validation_split or task.dataset is None or config.validation_split not in task.dataset:
            raise MergeInputError(f"task {config.task} has no validation split to evaluate on.")
        config.test_split = config.validation_split
    return task


def _headline(name: str, output: dict) -> TaskScore:
    """The first metric in the task's `metric_list` (any metric for groups) and its stderr, if numeric."""
    results = output["results"].get(name)
    if results is None:
        raise MergeInputError(f"lm-eval returned no result for task {name}.")
    metric_list = output.get("configs", {}).get(name, {}).get("metric_list") or []
    preferred = [m["metric"] for m in metric_list if isinstance(m.get("metric"), str)]
    pairs = [key.split(",", 1) for key in results if "," in key and "_stderr" not in key]
    numeric = [(m, f) for m, f in pairs if isinstance(results[f"{m},{f}"], (int, float))]
    if not numeric:
        raise MergeInputError(f"lm-eval returned no numeric metric for task {name}.")
    metric, filt = next(((m, f) for p in preferred for m, f in numeric if m == p), numeric[0])
    stderr = results.get(f"{metric}_stderr,{filt}")
    return TaskScore(
        metric=metric,
        value=float(results[f"{metric},{filt}"]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
    )
