"""lm-eval task YAMLs and JSONL data for the zoo tasks.

lm-eval 0.4.13 resolves relative `data_files` against the current directory, not the YAML's folder, so
the YAMLs are generated with absolute paths to the data. `write_task_yamls` can be re-run when a zoo
folder is moved (`load_zoo` does so). Each YAML names both splits (`validation_split`, `test_split`);
`pipeline.evaluation` chooses which one is scored by setting the loaded task's `test_split`, so one task
name serves the search (validation) and the final report (test).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.zoo.problems import Example, TaskKind

EVAL_SPLITS = ("validation", "test")


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.model_dump(exclude_none=True), sort_keys=True) + "\n")


def task_config(name: str, kind: TaskKind, data_dir: Path, max_answer_chars: int) -> dict:
    """The lm-eval config of one zoo task; `data_dir` is where the split files will finally live.

    `target_delimiter: ""` because prompts end with "=" and answers follow without a space (a leading
    space in the target would also defeat exact matching). Only built-in metrics: anything else makes
    lm-eval call `evaluate.load`, which needs the Hub.
    """
    config: dict = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_dir / f"{split}.jsonl") for split in EVAL_SPLITS}},
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if kind == "generate":
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_answer_chars + 2, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return config


def write_task_yamls(task_dir: Path, kinds: dict[str, TaskKind], final_task_dir: Path, max_answer_chars: int) -> None:
    """Write `<task>.yaml` into `task_dir`, pointing at data under `final_task_dir/data/<task>/`."""
    for name, kind in kinds.items():
        config = task_config(name, kind, final_task_dir / "data" / name, max_answer_chars)
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
