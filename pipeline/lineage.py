"""Lineage: what one merge was made of (a node: method, parameters, λ, every input with its revision and
fingerprint), as tags and a description for its registered version (`pipeline.registry` stores and reads it back).
A merged model can itself be an input to a later merge; lineage is then a tree."""

from __future__ import annotations

import json
from typing import Any

LINEAGE_ARTIFACT = "lineage.json"
MAX_TAG_CHARS = 5000


def lineage_node(config, inputs: dict, merged, run_id: str, flow_run_id: str | None) -> dict[str, Any]:
    """The lineage of one merge: `{"model", "method", "parameters", "lambdas", "run_id", "inputs": [...]}`.

    `inputs[k].lineage` is left null here; `pcbmerge lineage` fills it in for inputs that are registered
    models by reading their own node, recursively.
    """
    merge = config.merge_config()
    entries = [("base", merge.base_model, None)] + [("model", ref, params.model_dump(by_alias=True)) for ref, params in zip(merge.models, merge.model_params)]
    return {
        "model": merged.folder,
        "method": merge.method_name,
        "parameters": merge.params.model_dump(by_alias=True),
        "lambdas": merged.lambdas,
        "fingerprint": merged.fingerprint,
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        "inputs": [
            {
                "role": role,
                "ref": ref,
                "revision": inputs[ref].revision,
                "fingerprint": inputs[ref].fingerprint,
                "registered": inputs[ref].registered.model_dump() if inputs[ref].registered else None,
                "parameters": params,
                "lineage": None,
            }
            for role, ref, params in entries
        ],
    }


def lineage_tags(node: dict[str, Any]) -> dict[str, str]:
    tags = {
        "pcbmerge.method": str(node.get("method")),
        "pcbmerge.parameters": json.dumps(node.get("parameters"), sort_keys=True),
        "pcbmerge.lambdas": json.dumps(node.get("lambdas")),
        "pcbmerge.run_id": str(node.get("run_id")),
        "pcbmerge.fingerprint": str(node.get("fingerprint")),
        "prefect.flow_run_id": str(node.get("flow_run_id")),
    }
    for k, item in enumerate(node.get("inputs", [])):
        prefix = f"pcbmerge.input.{k}"
        tags[f"{prefix}.role"] = item["role"]
        tags[f"{prefix}.ref"] = item["ref"]
        tags[f"{prefix}.revision"] = str(item.get("revision"))
        tags[f"{prefix}.fingerprint"] = item["fingerprint"]
        if item.get("registered"):
            tags[f"{prefix}.registered"] = f"models:/{item['registered']['name']}/{item['registered']['version']}"
    return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}


def lineage_description(node: dict[str, Any]) -> str:
    lines = [f"Merged with `{node.get('method')}` {json.dumps(node.get('parameters'), sort_keys=True)}, λ = {node.get('lambdas')}.", ""]
    for item in node.get("inputs", []):
        lines.append(f"- {item['role']}: `{item['ref']}` (revision {item.get('revision')}, sha256 {item['fingerprint'][:16]}…)")
    lines += ["", f"MLflow run {node.get('run_id')}, Prefect flow run {node.get('flow_run_id')}."]
    return "\n".join(lines)
