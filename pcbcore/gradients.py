"""Per-tensor parameter values: mergekit's list-valued "gradients" and `filter:` conditions.

A parameter in a mergekit file is a scalar, a list of scalars (a gradient), or a list of conditions
`{filter: SUBSTRING, value: SETTING}`. mergekit resolves one per tensor (`mergekit.config.evaluate_setting`
and `mergekit.parameter_resolver`), and so does this module, with the same results:

- a gradient is read at the tensor's position t ∈ [0, 1] in its slice: with L layers in the slice, layer
  i has t = i / (L − 1) (t = 1 when L = 1); tensors outside the layers (embeddings, final norm, head)
  have t = 0. Numeric lists interpolate linearly between neighbouring entries, x = t·(len − 1),
  (1 − frac)·v[⌊x⌋] + frac·v[⌊x⌋ + 1], in Python floats; lists of booleans or strings pick v[⌊x⌋].
- conditions are tried in order and the first whose filter is absent, `*`, or a substring of the
  tensor's name gives the value; when none matches, the setting gives nothing and the next source is
  asked (per-model parameters, then the slice's, then the top-level `parameters`), then the default.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# The layer index in a tensor name: `model.layers.7.mlp…` (Llama, Mistral, Qwen…), `transformer.h.7.…`
# (GPT-2), `…blocks.7.…`, `…layer.7.…` (BERT).
LAYER_PATTERN = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<suffix>\..*)$")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a tensor in a numbered layer, or None for any other tensor."""
    found = LAYER_PATTERN.match(name)
    return (found["prefix"], int(found["index"]), found["suffix"]) if found else None


def is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def is_condition(value: Any) -> bool:
    return isinstance(value, dict) and "value" in value and set(value) <= {"value", "filter"}


def is_plain(setting: Any) -> bool:
    """Whether a setting is the same for every tensor (a scalar or null)."""
    return setting is None or is_scalar(setting)


def check_setting(setting: Any) -> str | None:
    """Why a setting is not of mergekit's form (None when it is)."""
    if setting is None or is_scalar(setting):
        return None
    if is_condition(setting):
        return check_setting(setting["value"])
    if isinstance(setting, list):
        if all(is_scalar(e) for e in setting):
            return None
        if all(is_condition(e) for e in setting):
            for cond in setting:
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    return "a condition's 'filter' must be a string"
                why = check_setting(cond["value"])
                if why:
                    return why
            return None
        return "a list must hold only scalars (a gradient) or only {filter, value} conditions"
    return "must be a scalar, a list of scalars (a gradient) or a list of {filter, value} conditions"


def leaves(setting: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar a setting can give, with its path under the key (`[1]`, `[0].value[2]`), for checking
    each one at config load."""
    if is_condition(setting):
        yield from leaves(setting["value"], f"{path}.value")
    elif isinstance(setting, list):
        for k, item in enumerate(setting):
            yield from leaves(item, f"{path}[{k}]")
    elif setting is not None:
        yield path, setting


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate(setting: Any, tensor_name: str | None, t: float) -> Any:
    """The value a setting gives for tensor `tensor_name` at gradient position `t` (None: no value).
    With `tensor_name` None every filter matches (a representative value, for the config as a whole)."""
    if is_condition(setting):
        setting = [setting]
    if setting is None or is_scalar(setting):
        return setting
    if not setting:
        return None
    if all(is_scalar(e) for e in setting):
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        if not all(_numeric(e) for e in setting):
            return setting[low]
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for cond in setting:
        pattern = cond.get("filter")
        if tensor_name is None or pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate(cond["value"], tensor_name, t)
    return None


def resolve(key: str, sources: list[dict | None], tensor_name: str | None, t: float) -> tuple[bool, Any]:
    """The first value any source gives for `key`, in precedence order: (found, value)."""
    for source in sources:
        if source and key in source:
            value = evaluate(source[key], tensor_name, t)
            if value is not None:
                return True, value
    return False, None
