"""One search candidate: θ_pre + Σ λ_i C_i (SPEC eq. 1) built in memory from the stored components on the
worker's device, loaded into a pooled model (never written as a checkpoint) and scored with lm-eval. A merge
with its own output vocabulary is built in that vocabulary (the model's embeddings resized to its rows) and
scored with the tokenizer the written merge gets (the store's side files).
Its score is keyed on (components key, λ, tasks, split, limit, task files, lm-eval version), so a resumed
search never evaluates the same candidate twice."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pcbcore.components import StoredComponents
from pcbcore.device import resolve_device
from pipeline.cache_keys import digest, task_files
from pipeline.evaluation import LM_EVAL_VERSION, evaluate_model
from pipeline.model_pool import worker_pool
from pipeline.search_state import CandidateRequest, CandidateScore, fitness_of, format_lambdas

log = logging.getLogger(__name__)


def build_candidate(model: Any, components: StoredComponents, lambdas: list[float], groups: int = 1) -> None:
    """Load θ_pre + Σ λ_i C_i into `model` in place, one tensor at a time (never a second whole model in
    memory); tied weights stay tied: only the file's keys load."""
    import torch

    targets = model.state_dict()  # tensors sharing the parameters' storage
    loaded, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in components.tensors(lambdas, groups=groups):
            if name not in targets:
                unexpected.append(name)
                continue
            targets[name].copy_(tensor)
            loaded.add(name)
    missing = {name for name in targets if name not in loaded and not _is_tied(model, name)}
    if unexpected or missing:
        raise RuntimeError(f"components do not fit the model: missing {sorted(missing)}, unexpected {unexpected}")


def _is_tied(model: Any, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def candidate_key(request: CandidateRequest) -> str:
    fitness = [request.tasks, request.split, request.limit, request.weights, task_files(request.include_path), LM_EVAL_VERSION]
    options = {"dtype": request.dtype, "apply_chat_template": request.apply_chat_template, "fewshot_as_multiturn": request.fewshot_as_multiturn}
    if options != {"dtype": "auto", "apply_chat_template": False, "fewshot_as_multiturn": True}:  # the defaults keep the old keys
        fitness.append(options)
    genome = [float(x) for x in request.lambdas]
    return "candidate-" + digest([request.components_key, genome if request.layer_groups == 1 else [request.layer_groups, genome], fitness])


def score_candidate(request: CandidateRequest) -> CandidateScore:
    """Build one candidate in memory from the stored components and score it on the search split."""
    device = str(resolve_device(request.device))
    cache = worker_pool()
    components = cache.stored(request.components_folder, device)
    base_dir = str(components.base_dir)
    # A merge that builds its own vocabulary (or chat template) is scored with the tokenizer it will be written with.
    tokenizer_dir = str(components.side_files) if components.side_files is not None else request.tokenizer_folder
    pair = cache.take_model(base_dir, tokenizer_dir, device, request.dtype, components.vocab_rows)
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
            apply_chat_template=request.apply_chat_template,
            fewshot_as_multiturn=request.fewshot_as_multiturn,
        )
        evaluated = time.perf_counter()
    finally:
        cache.give_back(base_dir, tokenizer_dir, device, pair, request.dtype, components.vocab_rows)
    scores = {name: score.value for name, score in result.scores.items()}
    fitness = fitness_of(scores, request.weights)
    log.info("λ=%s fitness %.4f (build %.3fs, evaluate %.2fs)", format_lambdas(request.lambdas), fitness, built - started, evaluated - built)
    return CandidateScore(
        lambdas=request.lambdas,
        scores=scores,
        fitness=fitness,
        split=request.split,
        build_seconds=round(built - started, 6),
        eval_seconds=round(evaluated - built, 6),
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
