"""The plots logged to MLflow: per-task score bars of a merge against its inputs (`scores.png`), and the
search's convergence (fitness per round, population and best so far, and λ trajectories)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.tables import Scores, task_names

ZERO_BAR = 0.006  # the height a 0 score is drawn with, on the 0-1 axis


def convergence_png(rounds: list[dict[str, Any]], model_labels: list[str]) -> bytes:
    """PNG bytes. `rounds` are `RoundRecord` dumps in search order (over every PCB ratio, one after another)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    best_line, best_lambdas = [], []
    for step, record in enumerate(rounds):
        fitness = [c["fitness"] for c in record["candidates"]]
        top.scatter([step] * len(fitness), fitness, s=12, color="tab:gray", alpha=0.6, label="population" if step == 0 else None)
        everyone = [c for r in rounds[: step + 1] for c in r["candidates"] if r["ratio"] == record["ratio"]]
        best = max(everyone, key=lambda c: c["fitness"])
        best_line.append(best["fitness"])
        best_lambdas.append(best["lambdas"])
    steps = list(range(len(rounds)))
    top.plot(steps, best_line, color="tab:red", marker="o", label="best so far")
    top.plot(steps, [r["mean_fitness"] for r in rounds], color="tab:blue", linestyle="--", label="population mean")
    top.set_ylabel("fitness (validation)")
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    for i, label in enumerate(model_labels):
        bottom.plot(steps, [lams[i] for lams in best_lambdas], marker=".", label=label)
    for step, record in enumerate(rounds):
        if step and record["ratio"] != rounds[step - 1]["ratio"]:
            for axis in (top, bottom):
                axis.axvline(step - 0.5, color="black", linewidth=0.8, linestyle=":")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_xlabel("round")
    bottom.set_ylabel("λ of the best so far")
    bottom.legend(loc="best", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def draw_score_bars(ax, scores: Scores) -> list:
    """One group of bars per task, one bar per model, each labelled with its value; returns the bar containers."""
    tasks = task_names(scores)
    labels = list(scores)
    width = 0.8 / max(len(labels), 1)
    containers = []
    for k, label in enumerate(labels):
        scored = [(t, scores[label][task]) for t, task in enumerate(tasks) if task in scores[label]]  # a missing score: no bar
        xs = [t + (k - (len(labels) - 1) / 2) * width for t, _ in scored]
        values = [v for _, v in scored]
        # A score of 0 is drawn as a sliver, so it reads as "scored 0" rather than "not scored"; the label gives the value.
        bars = ax.bar(xs, [max(v, ZERO_BAR) for v in values], width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        containers.append(bars)
    ax.set_xticks(range(len(tasks)), tasks)
    return containers


def bar_chart(scores: Scores, path: Path, title: str = "") -> Path:
    """Grouped bars: one group per task, one bar per model (merged vs experts vs base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = task_names(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    draw_score_bars(ax, scores)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.12)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
