"""The search's convergence plot: fitness per round (population and best so far) and λ trajectories."""

from __future__ import annotations

import io
from typing import Any


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
