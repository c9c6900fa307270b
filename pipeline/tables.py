"""The comparison table (models × tasks) as text, markdown and CSV."""

from __future__ import annotations

import csv
import io

Scores = dict[str, dict[str, float]]  # model label -> task -> score


def task_names(scores: Scores) -> list[str]:
    return list(dict.fromkeys(task for row in scores.values() for task in row))


def _rows(scores: Scores) -> tuple[list[str], list[list[str]]]:
    tasks = task_names(scores)
    header = ["model", *tasks, "mean"]
    rows = []
    for label, row in scores.items():
        values = [row.get(task) for task in tasks]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        rows.append([label, *("-" if v is None else f"{v:.3f}" for v in [*values, mean])])
    return header, rows


def format_text(scores: Scores) -> str:
    header, rows = _rows(scores)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_markdown(scores: Scores) -> str:
    header, rows = _rows(scores)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def format_csv(scores: Scores) -> str:
    header, rows = _rows(scores)
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    return out.getvalue()
