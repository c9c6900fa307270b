"""The plots logged to MLflow: per-task score bars of a merge against its inputs (`scores.png`), and the
search's convergence (fitness per round, population and best so far, and λ trajectories)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.tables import Scores, task_names


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


def bar_chart(scores: Scores, path: Path, title: str = "") -> Path:
    """Grouped bars: one group per task, one bar per model (merged vs experts vs base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = task_names(scores)
    labels = list(scores)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    for k, label in enumerate(labels):
        xs = [t + (k - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [scores[label].get(task, 0.0) for task in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
