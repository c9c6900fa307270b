"""Evaluation results: one task's headline score, and the scores of a model over its tasks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class TaskScore(BaseModel):
    """One task's headline metric (the first in its `metric_list`), e.g. `exact_match` or `acc`."""

    metric: str
    value: float
    stderr: float | None


class EvalResult(BaseModel):
    """Scores per task name, in the order the tasks were asked."""

    scores: dict[str, TaskScore]

    def mean(self) -> float:
        """Unweighted mean over tasks: the search's default fitness."""
        if not self.scores:
            raise ValueError("no task scores to average")
        return sum(score.value for score in self.scores.values()) / len(self.scores)

    def to_json(self) -> dict[str, dict[str, Any]]:
        """`{"<task>": {"metric": ..., "value": ..., "stderr": ...}}`, as `pcbmerge eval --json` prints it."""
        return {task: score.model_dump() for task, score in self.scores.items()}

    def format_table(self) -> str:
        """A plain-text table: task, metric, value ± stderr, and the mean."""
        rows = [("task", "metric", "value", "stderr")]
        for task, score in self.scores.items():
            stderr = "-" if score.stderr is None else f"{score.stderr:.4f}"
            rows.append((task, score.metric, f"{score.value:.4f}", stderr))
        if self.scores:
            rows.append(("mean", "", f"{self.mean():.4f}", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)
