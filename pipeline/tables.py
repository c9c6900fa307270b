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


def _left_columns(left: int | set[int]) -> set[int]:
    return set(range(left)) if isinstance(left, int) else left


def render_text(header: list[str], rows: list[list[str]], left: int | set[int] = 1) -> str:
    """A plain-text table: the first `left` columns (or the columns numbered in `left`) left-aligned, the
    others right-aligned, a dashed rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lefts = _left_columns(left)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def render_markdown(header: list[str], rows: list[list[str]], left: int | set[int] = 1) -> str:
    """A markdown table with the same alignment as `render_text` (no trailing newline)."""
    lefts = _left_columns(left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i in lefts else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_text(scores: Scores) -> str:
    return render_text(*_rows(scores))


def format_markdown(scores: Scores) -> str:
    return render_markdown(*_rows(scores)) + "\n"


def format_csv(scores: Scores) -> str:
    header, rows = _rows(scores)
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    return out.getvalue()
