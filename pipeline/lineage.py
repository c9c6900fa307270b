"""Lineage: what one merge was made of (a node: method, parameters, λ, every input with its revision and
fingerprint, the LoRA adapter of a `model+lora` reference as an input of its own), as tags and a description for its registered version (`pipeline.registry` stores and reads it back).
A merged model can itself be an input to a later merge; lineage is then a tree."""

from __future__ import annotations

import json
from typing import Any

from pcbcore.lora import split_reference
from pipeline.report import applicable_parameters, input_link, shared_model_parameters, short_revision

LINEAGE_ARTIFACT = "lineage.json"
MAX_TAG_CHARS = 5000


def lineage_node(config, inputs: dict, merged, run_id: str, flow_run_id: str | None) -> dict[str, Any]:
    """The lineage of one merge: `{"model", "method", "parameters", "lambdas", "run_id", "inputs": [...]}`.

    `inputs[k].lineage` is left null here; `pcbmerge lineage` fills it in for inputs that are registered
    models by reading their own node, recursively.
    """
    merge = config.merge_config()
    entries = [("base", merge.base_model, None)] + [("model", ref, params.model_dump(by_alias=True)) for ref, params in zip(merge.models, merge.model_params)]
    items, adapters = [], []
    for role, ref, params in entries:
        # (`pipeline.references.checkpoint_of` / `adapter_of`, which this module cannot import: references → registry → lineage)
        model_ref, lora_ref = split_reference(ref)
        model, adapter = inputs[model_ref], None if lora_ref is None else inputs[lora_ref]
        items.append({**_input_item(role, model, params), **({"adapter": adapter.ref} if adapter else {})})
        if adapter is not None:
            adapters.append({**_input_item("lora", adapter, None), "applied_to": model.ref})
    return {
        "model": merged.folder,
        "method": merge.method_name,
        "parameters": merge.params.model_dump(by_alias=True),
        "lambdas": merged.lambdas,
        "fingerprint": merged.fingerprint,
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        # The LoRA adapters of `model+lora` references come after the base and the models (each names the
        # model it is applied to), so the models' order is λ's order.
        "inputs": items + adapters,
    }


def _input_item(role: str, checkpoint, params: dict | None) -> dict[str, Any]:
    return {
        "role": role,
        "ref": checkpoint.ref,
        "source": checkpoint.source,
        "revision": checkpoint.revision,
        "fingerprint": checkpoint.fingerprint,
        "registered": checkpoint.registered.model_dump() if checkpoint.registered else None,
        "parameters": params,
        "lineage": None,
    }


def lineage_tags(node: dict[str, Any]) -> dict[str, str]:
    """Compact, searchable tags for a registered version: the method and only its parameters that apply
    (`pcbmerge.param.<key>`, per-model keys too when every model shares the value), λ, the fingerprint, and
    per input its role, ref, revision (where it has one), fingerprint, parameters and a link."""
    method = str(node.get("method"))
    params = applicable_parameters(method, node.get("parameters") or {})
    tags = {
        "pcbmerge.method": method,
        "pcbmerge.parameters": json.dumps(params, sort_keys=True),
        "pcbmerge.lambdas": json.dumps(node.get("lambdas")),
        "pcbmerge.run_id": str(node.get("run_id")),
        "pcbmerge.fingerprint": str(node.get("fingerprint")),
    }
    if node.get("flow_run_id"):
        tags["prefect.flow_run_id"] = str(node["flow_run_id"])
    for key, value in {**shared_model_parameters(node), **params}.items():
        tags[f"pcbmerge.param.{key}"] = json.dumps(value)
    tracking_uri = _tracking_uri()
    for k, item in enumerate(node.get("inputs", [])):
        prefix = f"pcbmerge.input.{k}"
        tags[f"{prefix}.role"] = item["role"]
        tags[f"{prefix}.ref"] = item["ref"]
        if item.get("revision"):
            tags[f"{prefix}.revision"] = str(item["revision"])
        tags[f"{prefix}.fingerprint"] = item["fingerprint"]
        if item.get("parameters"):
            tags[f"{prefix}.parameters"] = json.dumps(item["parameters"], sort_keys=True)
        for key in ("adapter", "applied_to"):  # a model+lora reference: the model's adapter, the adapter's model
            if item.get(key):
                tags[f"{prefix}.{key}"] = item[key]
        if item.get("registered"):
            tags[f"{prefix}.registered"] = f"models:/{item['registered']['name']}/{item['registered']['version']}"
        link = input_link(item, tracking_uri)
        if "](" in link:
            tags[f"{prefix}.link"] = link.split("](", 1)[1].rstrip(")")
    return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}


def lineage_description(node: dict[str, Any]) -> str:
    """The version's description (markdown): method, its applicable parameters, λ, the inputs as links."""
    method = str(node.get("method"))
    params = {**shared_model_parameters(node), **applicable_parameters(method, node.get("parameters") or {})}
    shown = ", ".join(f"{k} = {v}" for k, v in params.items())
    lambdas = ", ".join(f"{float(x):.4g}" for x in node.get("lambdas") or [])
    lines = [f"Merged with `{method}`" + (f" ({shown})" if shown else "") + f", λ = [{lambdas}].", ""]
    tracking_uri = _tracking_uri()
    for item in node.get("inputs", []):
        detail = ", ".join(x for x in (short_revision(item), f"sha256 {item['fingerprint'][:16]}…") if x)
        lines.append(f"- {item['role']}: {input_link(item, tracking_uri)} ({detail})")
    where = [f"MLflow run {node['run_id']}"] if node.get("run_id") else []
    if node.get("flow_run_id"):
        where.append(f"Prefect flow run {node['flow_run_id']}")
    if where:
        lines += ["", ", ".join(where) + "."]
    return "\n".join(lines)


def _tracking_uri() -> str:
    from pipeline.settings import load_settings

    return load_settings().tracking_uri
