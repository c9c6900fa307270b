"""`build_zoo`: a tokenizer, a base model pre-trained here, one fully fine-tuned expert per task.

Layout of a zoo folder::

    zoo.json                      manifest (`pipeline.zoo.manifest.ZooManifest`)
    base/                         transformers checkpoint (safetensors, float32) + tokenizer
    experts/<task>/               same architecture and tensor names as base/
    tasks/<task>.yaml             lm-eval task configs (the `--include-path` for the zoo tasks)
    tasks/data/<task>/{validation,test,train}.jsonl

The folder is built in a temporary folder beside the target and renamed into place, so an interrupted
build never leaves a half-written zoo behind.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pcbcore.errors import MergeInputError
from pcbcore.scratch import owned_folder, remove_leftovers
from pipeline.evaluation import model_content_hash
from pipeline.zoo.lm_eval_tasks import write_jsonl, write_task_yamls
from pipeline.zoo.manifest import MANIFEST, ZooManifest
from pipeline.zoo.problems import TaskSet, TaskSpec, draw_splits
from pipeline.zoo.tokenizer import build_tokenizer
from pipeline.zoo.training import Line, ModelShape, TrainSettings, deterministic_torch, new_model, train

log = logging.getLogger(__name__)

ZooSize = Literal["micro", "demo"]


class SizePreset(BaseModel):
    """Everything a zoo size fixes: model shape, task difficulty, split sizes, training budgets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: ModelShape
    task_spec: TaskSpec
    split_sizes: dict[str, int]
    pretrain: TrainSettings
    finetune: TrainSettings


PRESETS: dict[str, SizePreset] = {
    # micro: for tests; ~15 s of training on one CPU thread (seed 0, test split: base 0.00/0.00/0.16/0.47,
    # experts on their own task 0.75/1.00/0.75/1.00)
    "micro": SizePreset(
        shape=ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        task_spec=TaskSpec(letters="abcdefgh", min_len=3, max_len=4, n_words=10, max_words=3, n_polar_words=4),
        split_sizes={"test": 32, "validation": 32, "train": 800},
        pretrain=TrainSettings(steps=200, batch_size=32, learning_rate=3e-3),
        finetune=TrainSettings(steps=100, batch_size=32, learning_rate=2e-3),
    ),
    # demo: the headline table; ~3.5 min of CPU (seed 0, test split: base 0.02/0.07/0.14/0.39, experts 1.00 each)
    "demo": SizePreset(
        shape=ModelShape(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        task_spec=TaskSpec(letters="abcdefghij", min_len=3, max_len=5, n_words=12, max_words=4, n_polar_words=6),
        split_sizes={"test": 100, "validation": 100, "train": 3000},
        pretrain=TrainSettings(steps=800, batch_size=32, learning_rate=2e-3),
        finetune=TrainSettings(steps=400, batch_size=32, learning_rate=1e-3),
    ),
}


def build_zoo(out_dir: str | Path, size: ZooSize = "demo", seed: int = 0, overwrite: bool = False) -> Path:
    """Build a zoo into `out_dir` and return its absolute path; the same seed gives the same weights.

    Refuses an existing non-empty `out_dir` unless `overwrite`; the old folder is replaced only once the
    new one is complete.
    """
    if size not in PRESETS:
        raise MergeInputError(f"unknown zoo size {size!r}; choose one of {sorted(PRESETS)}.")
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise MergeInputError(f"zoo folder {target} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise MergeInputError(f"zoo folder {target} exists and is not empty; pass overwrite to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, target.name)  # an earlier build that was killed
    work = owned_folder(target.parent, target.name)
    work.chmod(0o755)  # a zoo is meant to be shared
    try:
        _build_into(work, target, PRESETS[size], size, seed)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("zoo ready in %s", target)
    return target


def _build_into(work: Path, target: Path, preset: SizePreset, size: str, seed: int) -> None:
    started = time.perf_counter()
    tasks = TaskSet(preset.task_spec, seed)
    splits = {name: draw_splits(tasks, name, preset.split_sizes, seed) for name in tasks.names}
    for name, by_split in splits.items():
        for split, examples in by_split.items():
            write_jsonl(work / "tasks" / "data" / name / f"{split}.jsonl", examples)
    longest = max(len(e.answer) for by_split in splits.values() for es in by_split.values() for e in es)
    write_task_yamls(work / "tasks", tasks.kinds, target / "tasks", longest)

    tokenizer = build_tokenizer()
    final_loss: dict[str, float] = {}
    hashes: dict[str, str] = {}
    with deterministic_torch(seed):
        base = new_model(preset.shape, tokenizer, seed)
        final_loss["base"] = train(base, tokenizer, _format_corpus(tasks, splits, seed), preset.pretrain, seed, mask_prompt=False, label="base")
        hashes["base"] = _save(base, tokenizer, work / "base")
        for name in tasks.names:
            expert = copy.deepcopy(base)
            lines = [Line(text=e.prompt + e.answer + "\n", prompt_chars=len(e.prompt)) for e in splits[name]["train"]]
            final_loss[name] = train(expert, tokenizer, lines, preset.finetune, seed, mask_prompt=True, label=name)
            hashes[name] = _save(expert, tokenizer, work / "experts" / name)

    manifest = ZooManifest(
        base="base",
        experts={name: f"experts/{name}" for name in tasks.names},
        tasks=list(tasks.names),
        task_dir="tasks",
        task_kinds=dict(tasks.kinds),
        size=size,
        seed=seed,
        shape=preset.shape,
        task_spec=preset.task_spec,
        pretrain=preset.pretrain,
        finetune=preset.finetune,
        split_sizes=preset.split_sizes,
        max_gen_toks=longest,
        final_loss=final_loss,
        weights_sha256=hashes,
        build_seconds=round(time.perf_counter() - started, 2),
    )
    (work / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")


def _format_corpus(tasks: TaskSet, splits: dict, seed: int) -> list[Line]:
    """The base's pre-training corpus: every task's training prompts with format-only answers.

    Only `train` prompts are used, so validation and test items are unseen by every model.
    """
    rng = random.Random(f"corpus-{seed}")
    lines = []
    for name in tasks.names:
        for example in splits[name]["train"]:
            text = example.prompt + tasks.format_answer(name, example, rng) + "\n"
            lines.append(Line(text=text, prompt_chars=len(example.prompt)))
    return lines


def _save(model, tokenizer, folder: Path) -> str:
    """Save a checkpoint (safetensors) with its tokenizer, readable by others; return its content hash."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors 0.8 writes 0600 whatever the umask
    return model_content_hash(model)
