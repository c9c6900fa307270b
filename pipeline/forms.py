"""Typed forms for the Prefect UI, built from the method registry.

The YAML keeps mergekit's layout (`merge_method`, a free `parameters` mapping), so a mergekit file runs
unchanged; the deployments' forms show more: `merge_method` is a select of the registered names, and
`parameters` offers one typed, described field per parameter of the chosen method (one set per method,
from its params models in `pcbcore.methods.METHODS`).

Each form carries two schemas. What the UI *renders* is lenient: per-method field sets to pick from, their
types, defaults and descriptions. What the server *validates* is strict and sits where the UI does not look
(`dependentSchemas`): per method, its exact keys and ranges; per optional block, its own fields. JSON Schema
reports an error inside `anyOf` only as "is not valid under any of the given schemas" at the whole block; the
strict schemas avoid `anyOf`, so a typo (`ratoi`) or an out-of-range value (`ratio: 1.5`, `limit: 0`) is
refused before the run starts with a message at that very field.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from pcbcore.methods import METHODS

METHOD_NAMES = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # the registered names, in the registry's order: a select in the UI

# Keywords that only restrict values: left out of what the UI renders, kept in what the server validates.
_RESTRICTING = (
    "additionalProperties",
    "required",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
)


def shown(info) -> bool:
    """Whether a method's key is a form field: not one accepted only so mergekit's files run, with no effect
    (`json_schema_extra={"no_effect": True}`, e.g. task arithmetic's `density`)."""
    return not (isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("no_effect"))


def parameters_model(method: str, form: bool = False) -> type[BaseModel]:
    """The top-level `parameters` of `method`: its own keys and, as defaults for every model, its per-model
    keys (mergekit's layout), each with the registry's type, default, range and description."""
    entry = METHODS[method]
    fields = {
        name: (info.annotation, info) for name, info in {**entry.params.model_fields, **entry.model_params.model_fields}.items() if not form or shown(info)
    }
    model = create_model(
        f"{method}_parameters",
        __config__=ConfigDict(extra="forbid", frozen=True, populate_by_name=True, title=method),
        __doc__=f"Parameters of merge method '{method}'.",
        **fields,
    )
    return model


def model_parameters_model(method: str, form: bool = False) -> type[BaseModel]:
    """Per-model `parameters` of `method`: every key optional, since an unset one takes the top-level value."""
    entry = METHODS[method]
    fields = {
        name: (
            (Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation) | None,
            Field(None, alias=info.alias, description=info.description),
        )
        for name, info in entry.model_params.model_fields.items()
        if not form or shown(info)
    }
    return create_model(
        f"{method}_model_parameters",
        __config__=ConfigDict(extra="forbid", frozen=True, populate_by_name=True, title=f"{method} (per model)"),
        **fields,
    )


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema for validation only: `anyOf [X, null]` becomes X with `null` added to its types, so an error
    inside it is reported at the field with the real reason ("0 is less than or equal to the minimum of 0")."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: walk(v) for k, v in node.items()}
            options = node.get("anyOf")
            if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
                other = next(o for o in options if o != {"type": "null"})
                if isinstance(other.get("type"), str):
                    rest = {k: v for k, v in node.items() if k != "anyOf"}
                    node = {**other, **rest, "type": [other["type"], "null"]}
                    if "enum" in node:
                        node["enum"] = [*node["enum"], None]
            return node
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def lenient(schema: dict[str, Any]) -> dict[str, Any]:
    """What the UI renders: the same fields, types, defaults and descriptions, without the restrictions
    (those are checked by the strict schema, at the field)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if k not in _RESTRICTING}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(copy.deepcopy(schema))


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its aliases (`lambda`), self-contained (these models nest no others)."""
    schema = model.model_json_schema(by_alias=True)
    assert "$defs" not in schema, f"{model.__name__} nests models; inline them first"
    return schema


def method_parameters_schema() -> dict[str, Any]:
    """`parameters` as the UI shows it: one field set per method, to pick by the method's name."""
    return {
        "title": "Parameters",
        "description": "the method's parameters: pick the set named like merge_method (per-model keys here are defaults for every model)",
        "default": {},
        "anyOf": [lenient(inline_schema(parameters_model(name, form=True))) for name in METHOD_NAMES],
    }


def model_entry_schema(description: str) -> dict[str, Any]:
    """`models` as the UI shows it: a list of {model, parameters}, the per-model keys of every method typed."""
    keys: dict[str, Any] = {}
    users: dict[str, list[str]] = {}
    for name in METHOD_NAMES:
        for key, spec in inline_schema(model_parameters_model(name, form=True))["properties"].items():
            keys.setdefault(key, spec)
            users.setdefault(key, []).append(name)
    properties = {}
    for key, spec in keys.items():
        spec = lenient(strict(spec))
        spec["type"] = [t for t in spec["type"] if t != "null"][0] if isinstance(spec.get("type"), list) else spec.get("type")
        spec.pop("default", None)
        spec["description"] = f"{spec.get('description', key)} ({', '.join(users[key])}; unset: the top-level value)"
        properties[key] = spec
    return {
        "title": "Models",
        "description": description,
        "type": "array",
        "items": {
            "title": "Model",
            "type": "object",
            "properties": {
                "model": {"title": "Model", "type": "string", "description": "a folder, a Hub id org/name[@revision], or models:/NAME/VERSION"},
                "parameters": {"title": "Parameters", "type": "object", "description": "per-model parameters, e.g. lambda (λ_i)", "properties": properties},
            },
            "required": ["model"],
        },
    }


def method_dependent_schema() -> dict[str, Any]:
    """Per method, the exact keys and ranges of `parameters` and of each model's `parameters`: an if/then
    chain on `merge_method` (validated by the server, not rendered by the UI)."""
    chain: dict[str, Any] = {}
    for name in reversed(METHOD_NAMES):
        then = {
            "properties": {
                "parameters": strict(inline_schema(parameters_model(name, form=True))),
                "models": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"parameters": strict(inline_schema(model_parameters_model(name, form=True)))}},
                },
            }
        }
        chain = {"if": {"properties": {"merge_method": {"const": name}}}, "then": then, **({"else": chain} if chain else {})}
    return chain


def block_schema(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A nested block as the UI shows it (its fields, lenient); `block_check` validates it."""
    return {**lenient(strict(inline_schema(model))), "description": description}


def block_check(field: str, model: type[BaseModel]) -> dict[str, Any]:
    """The block's exact fields and ranges, each error reported at its field."""
    return {"properties": {field: strict(inline_schema(model))}}


def optional_block_schema(model: type[BaseModel], description: str) -> dict[str, Any]:
    """An optional nested block as the UI shows it: the block (its fields, lenient) or null."""
    return {"description": description, "default": None, "anyOf": [lenient(strict(inline_schema(model))), {"type": "null"}]}


def optional_block_check(field: str, model: type[BaseModel]) -> dict[str, Any]:
    """When the block is given (an object), its exact fields and ranges, reported at the field."""
    return {"if": {"properties": {field: {"type": "object"}}}, "then": {"properties": {field: strict(inline_schema(model))}}}


def form_parameters(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` with every other parameter of `method` at its default: a form's defaults, so the UI opens on the
    method's own field set (it picks the set sharing the most keys with the value). The same merge: these are
    the values the method uses when the keys are left out."""
    if method not in METHODS:
        return given
    model = parameters_model(method, form=True)
    defaults = {info.alias or name: info.get_default(call_default_factory=True) for name, info in model.model_fields.items() if not info.is_required()}
    return {**{k: v for k, v in defaults.items() if v is not None}, **given}


def check_parameters(method: str, parameters: dict[str, Any]) -> None:
    """Python's side of the same check (a config built in code or sent through the API): unknown keys and
    out-of-range values of `parameters` for `method`, as a `ValueError` naming the key."""
    if method not in METHODS:
        return  # named by the `merge_method` field's own error
    model = parameters_model(method)
    unknown = sorted(set(parameters) - {info.alias or name for name, info in model.model_fields.items()})
    if unknown:
        allowed = sorted(info.alias or name for name, info in model.model_fields.items())
        raise ValueError(f"unknown key 'parameters.{unknown[0]}' for merge method '{method}'; allowed keys are {allowed}")
    try:
        model.model_validate(parameters)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(["parameters", *(str(p) for p in err.get("loc", ()))])
        raise ValueError(f"key '{key}': {err.get('msg', 'is invalid').removeprefix('Value error, ')} (got {err.get('input')!r})") from None
