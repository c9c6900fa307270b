"""What a flow run shows about itself, rendered as plain text: links to its MLflow run and registered version,
the applicable parameters of its method, its lineage as a mermaid graph and as a picture, and the summary
that the Prefect run page (`tasks/report.py`) and the MLflow version page carry.

Links are MLflow UI pages when the tracking store is a server (http/https); for a local store (SQLite, a
folder) there is no page to open, so the run id and the local paths are given instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HUB_URL = "https://huggingface.co"

# Parameters that only some settings of a method read: (method, key) -> when it applies. A key that does not
# apply is left out of what is shown (the full effective parameters stay in lineage.json and the run's params).
APPLIES_WHEN = {
    ("pcb", "clip_quantile"): lambda params: params.get("variant") == "release",
}
# Keys accepted for mergekit's files that change nothing in the result.
NO_EFFECT = {"int8_mask"}


def applicable_parameters(method: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters that shape this merge: e.g. PCB's paper variant without `clip_quantile`."""
    return {key: value for key, value in parameters.items() if key not in NO_EFFECT and APPLIES_WHEN.get((method, key), lambda params: True)(parameters)}


def shared_model_parameters(node: dict[str, Any]) -> dict[str, Any]:
    """Per-model keys (density, weight) whose value every model shares; λ is shown as the λ vector instead."""
    models = [item.get("parameters") or {} for item in node.get("inputs", []) if item.get("role") == "model"]
    if not models:
        return {}
    keys = set.intersection(*(set(m) for m in models)) - {"lambda"}
    return {key: models[0][key] for key in sorted(keys) if all(m[key] == models[0][key] for m in models)}


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, or None for a local store."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if is_server(tracking_uri) else None


def version_url(tracking_uri: str, model_uri: str) -> str | None:
    """The MLflow UI page of `models:/NAME/VERSION`, or None for a local store or another kind of reference."""
    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri or "")
    if not match or not is_server(tracking_uri):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{match.group(1)}/versions/{match.group(2)}"


def input_link(item: dict[str, Any], tracking_uri: str) -> str:
    """An input of a lineage node as markdown: a link to its registry version or its Hub revision, else its path."""
    ref = item["ref"]
    registered = item.get("registered")
    if registered:
        uri = f"models:/{registered['name']}/{registered['version']}"
        url = version_url(tracking_uri, uri)
        return f"[{uri}]({url})" if url else f"`{uri}`"
    if item.get("source") == "hub":
        repo = ref.split("@", 1)[0]
        revision = item.get("revision") or ref.partition("@")[2] or "main"
        return f"[{repo}@{revision[:12]}]({HUB_URL}/{repo}/tree/{revision})"
    return f"`{ref}`"


def short_revision(item: dict[str, Any]) -> str:
    """`revision abc123…` for inputs that have one; nothing for a local folder."""
    revision = item.get("revision")
    return f"revision {revision[:12]}" if revision else ""


def lineage_mermaid(node: dict[str, Any]) -> str:
    """The lineage tree as a mermaid graph in a markdown block: inputs (and their own inputs, where known) point
    at the merge they went into, each edge carrying the model's λ."""
    lines = ["```mermaid", "graph LR"]
    counter = iter(range(10**6))

    def text(value: str) -> str:
        return value.replace('"', "'")

    def add(current: dict[str, Any]) -> str:
        me = f"n{next(counter)}"
        params = ", ".join(f"{k}={v}" for k, v in applicable_parameters(str(current.get("method")), current.get("parameters") or {}).items())
        lines.append(f'    {me}["{text(_model_label(current.get("model", "merge")))}<br/>{text(str(current.get("method")))} {text(params)}"]')
        models = iter(_per_model(current))
        for item in current.get("inputs", []):
            child = f"n{next(counter)}" if not item.get("lineage") else add(item["lineage"])
            if not item.get("lineage"):
                detail = " ".join(x for x in (item["role"], short_revision(item), f"sha256 {item['fingerprint'][:12]}") if x)
                lines.append(f'    {child}["{text(_model_label(item["ref"]))}<br/>{text(detail)}"]')
            label = item["role"] if item["role"] in ("base", "lora") else f"λ={_number(next(models, None))}"
            lines.append(f"    {child} -->|{label}| {me}")
        return me

    add(node)
    lines.append("```")
    return "\n".join(lines) + "\n"


def lineage_png(node: dict[str, Any], path: Path) -> Path:
    """The lineage as a picture: every input in a box on the left, an arrow with its λ to the merge on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = node.get("inputs", [])
    lambdas = iter(_per_model(node))
    height = max(2.5, 0.9 * len(inputs) + 1)
    fig, ax = plt.subplots(figsize=(9, height))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(inputs) + 1)
    ax.axis("off")
    box = dict(boxstyle="round,pad=0.4", facecolor="#eef3fb", edgecolor="#4a6fa5")
    target_y = (len(inputs) + 1) / 2
    params = {**shared_model_parameters(node), **applicable_parameters(str(node.get("method")), node.get("parameters") or {})}
    merged = f"{_model_label(node.get('model', 'merge'))}\n{node.get('method')}\n" + "\n".join(f"{k} = {v}" for k, v in params.items())
    ax.text(7.6, target_y, merged, ha="center", va="center", fontsize=9, bbox={**box, "facecolor": "#fdf0e6", "edgecolor": "#c0692b"})
    for k, item in enumerate(inputs):
        y = len(inputs) - k
        detail = " · ".join(x for x in (item["role"], short_revision(item), f"sha256 {item['fingerprint'][:10]}") if x)
        ax.text(2.2, y, f"{_model_label(item['ref'])}\n{detail}", ha="center", va="center", fontsize=8, bbox=box)
        ax.annotate("", xy=(6.0, target_y), xytext=(3.6, y), arrowprops=dict(arrowstyle="->", color="#555555"))
        label = item["role"] if item["role"] in ("base", "lora") else f"λ = {_number(next(lambdas, None))}"
        ax.text(4.8, (y + target_y) / 2 + 0.12, label, ha="center", fontsize=8, color="#333333")
    ax.set_title("lineage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lineage_lines(node: dict[str, Any], indent: str = "") -> list[str]:
    """The lineage tree as text, one line per merge and per input (`pcbmerge lineage`)."""
    import json

    params = json.dumps(applicable_parameters(str(node.get("method")), node.get("parameters") or {}), sort_keys=True)
    lines = [f"{indent}{node['model']}  {node.get('method')} {params}  λ={node.get('lambdas')}  run {node.get('run_id')}"]
    for item in node.get("inputs", []):
        # A registered input's revision is its NAME/VERSION, already in its ref; a Hub input's is its commit.
        revision = f"  revision {item['revision'][:12]}" if item.get("revision") and not item.get("registered") else ""
        lines.append(f"{indent}  {item['role']:<5} {item['ref']}{revision}  sha256 {item['fingerprint'][:12]}")
        if item.get("lineage"):
            lines += lineage_lines(item["lineage"], indent + "      ")
    return lines


def links_markdown(tracking_uri: str, experiment_id: str | None, run_id: str, model_uri: str | None, folder: str | None) -> str:
    """Where the run's results are: the MLflow run, the registered version, the output folder."""
    url = run_url(tracking_uri, experiment_id, run_id) if experiment_id else None
    lines = [f"- MLflow run: [{run_id}]({url})" if url else f"- MLflow run: `{run_id}` in `{tracking_uri}`"]
    if model_uri:
        page = version_url(tracking_uri, model_uri)
        lines.append(f"- registered version: [{model_uri}]({page})" if page else f"- registered version: `{model_uri}`")
    if folder:
        lines.append(f"- output folder: `{folder}`")
    return "\n".join(lines) + "\n"


def watch_title(merged: bool, count: int, model: str | None) -> str:
    """A watch run's name: whether it merged, at a glance."""
    return f"watch: merged {count} into {model}" if merged else "watch: no change"


def watch_markdown(source: str, refs: list[str], merged: bool, model: str | None, reason: str) -> str:
    """A watch run's page: what it found, and what it did about it."""
    found = "\n".join(f"- `{ref}`" for ref in refs) or "- none"
    return f"# {watch_title(merged, len(refs), model)}\n\n{reason[:1].upper() + reason[1:]}.\n\nSource `{source}` holds:\n\n{found}\n"


def _per_model(node: dict[str, Any]) -> list[Any]:
    """One λ per model input, or none to show when λ is a per-layer-group genome."""
    lambdas = list(node.get("lambdas") or [])
    models = [item for item in node.get("inputs", []) if item.get("role") == "model"]
    return lambdas if len(lambdas) == len(models) else []


def _model_label(ref: str) -> str:
    """A short name for a box: `models:/NAME/VERSION` as is, a path or Hub id by its last part."""
    if ref.startswith("models:/"):
        return ref
    return ref.rstrip("/").split("@")[0].rsplit("/", 1)[-1] or ref


def _number(value: Any) -> str:
    return "?" if value is None else f"{float(value):.4g}"
