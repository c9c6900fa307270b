"""Merge configuration: mergekit's YAML layout, validated strictly.

A mergekit user's file runs unchanged for the methods both tools support, with the same meaning and
defaults of each key:

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert-a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/expert-b
    parameters: {normalize: true, lambda: 1.0, density: 0.7}   # also defaults for per-model keys
    dtype: bfloat16            # mergekit's working dtype; here the output dtype unless out_dtype is set
    out_dtype: bfloat16
    tokenizer_source: base     # or a model path

pcbmerge's own keys: PCB's `ratio`, `variant`, `scope`, `clip_quantile`; TIES's `scope`; DARE's `seed`;
per-model `lambda` (the coefficient λ_i of SPEC eq. 1, default the top-level `lambda`, default 1);
`allow_pickle`. Every key is checked: a typo is an error that names it and lists what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pcbcore.errors import MergeInputError
from pcbcore.methods import METHODS, MergeMethod
from pcbcore.methods.base import FrozenModel, ModelParams

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

# mergekit keys that pcbmerge does not implement: refused with a sentence rather than "unknown key".
UNSUPPORTED_KEYS = {
    "slices": "layer slices ('slices') are not supported; list whole models under 'models'",
    "tokenizer": "the 'tokenizer' block is not supported; use 'tokenizer_source'",
    "chat_template": "'chat_template' is not supported; the tokenizer source's template is copied",
}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="local folder (or, in the pipeline, a Hub id or models:/ URI)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model parameters, e.g. {lambda: 1.1} or {weight: 2}")


class RawMergeConfig(BaseModel):
    """The YAML as written, before the method's parameters are checked. The pipeline's config extends it,
    so its field descriptions are also that form's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str = Field(description="linear | task_arithmetic | ties | dare_linear | dare_ties | pcb")
    base_model: str | None = Field(
        default=None, description="the pre-trained checkpoint: a folder (or, in the pipeline, org/name@rev on the Hub, or models:/NAME/VERSION)"
    )
    models: list[ModelEntry] = Field(default_factory=list, description="the fine-tuned checkpoints to merge, each with optional per-model parameters")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters, e.g. {ratio: 0.1} for pcb, {density: 0.5} for ties")
    dtype: str | None = Field(default=None, description="dtype to read the inputs in (default: as stored)")
    out_dtype: str | None = Field(default=None, description="dtype of the merged weights (default: the inputs' dtype)")
    tokenizer_source: str | None = Field(default=None, description="where the tokenizer comes from (default: the base)")
    allow_pickle: bool = Field(default=False, description="accept pickle checkpoints (loaded with weights_only=True)")
    name: str | None = Field(default=None, description="a name for the merge")


class MergeConfig(BaseModel):
    """A validated merge: the method, its parameters, and one parameter set per fine-tuned model."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    raw: RawMergeConfig
    method_name: str
    base_model: str
    models: tuple[str, ...]
    params: FrozenModel
    model_params: tuple[ModelParams, ...]
    out_dtype: torch.dtype | None
    tokenizer_source: str

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.method_name]

    @property
    def lambdas(self) -> list[float]:
        return [m.lambda_ for m in self.model_params]

    def with_lambdas(self, lambdas: list[float]) -> MergeConfig:
        if len(lambdas) != len(self.models):
            raise MergeInputError(f"{len(lambdas)} coefficients given for {len(self.models)} models")
        params = tuple(m.model_copy(update={"lambda_": float(x)}) for m, x in zip(self.model_params, lambdas))
        return self.model_copy(update={"model_params": params})

    def with_paths(self, resolve) -> MergeConfig:
        """The same merge with every model reference replaced by `resolve(ref)` (a local folder)."""
        return self.model_copy(
            update={
                "base_model": str(resolve(self.base_model)),
                "models": tuple(str(resolve(m)) for m in self.models),
                "tokenizer_source": str(resolve(self.tokenizer_source)),
            }
        )

    def describe(self) -> dict[str, Any]:
        """Method and effective parameters, for model cards and tracking."""
        return {
            "merge_method": self.method_name,
            "base_model": self.base_model,
            "parameters": self.params.model_dump(by_alias=True),
            "models": [{"model": m, "parameters": p.model_dump(by_alias=True)} for m, p in zip(self.models, self.model_params)],
            "out_dtype": str(self.out_dtype).removeprefix("torch.") if self.out_dtype else None,
        }


def error_sentence(source: str, where: str, err: dict) -> str:
    """One sentence for one pydantic error: `source`, the key at fault (under `where`), what is wrong."""
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    key = f"{where}.{loc}" if where and loc else (where or loc)
    msg = err.get("msg", "is invalid").removeprefix("Value error, ")
    given = err.get("input")
    if err.get("type") == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if err.get("type") == "missing":
        return f"{source}: key '{key}' is required"
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{source}: key '{key}': {msg}{shown}"


def _validate(model: type[BaseModel], data: dict, source: str, where: str, allowed: list[str] | None = None):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        sentence = error_sentence(source, where, err)
        if err.get("type") == "extra_forbidden" and allowed is not None:
            sentence += f"; allowed keys are {sorted(allowed)}"
        raise MergeInputError(sentence) from None


def _dtype(name: str | None, key: str, source: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise MergeInputError(f"{source}: key '{key}' must be one of {sorted(set(DTYPE_NAMES))} (got {name!r})")
    return DTYPE_NAMES[name]


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def parse_merge_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping into a `MergeConfig`; every error names `source` and the key."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: a merge config must be a YAML mapping with 'merge_method', 'base_model' and 'models'")
    for key, why in UNSUPPORTED_KEYS.items():
        if key in data:
            raise MergeInputError(f"{source}: {why}")
    raw = _validate(RawMergeConfig, data, source, "", allowed=_keys_of(RawMergeConfig))
    if raw.merge_method not in METHODS:
        raise MergeInputError(f"{source}: unknown merge method '{raw.merge_method}'; choose one of {sorted(METHODS)}")
    method = METHODS[raw.merge_method]
    global_keys, model_keys = _keys_of(method.params), _keys_of(method.model_params)

    top_global = {k: v for k, v in raw.parameters.items() if k in global_keys}
    top_model = {k: v for k, v in raw.parameters.items() if k in model_keys}
    unknown = sorted(set(raw.parameters) - set(global_keys) - set(model_keys))
    if unknown:
        raise MergeInputError(
            f"{source}: unknown key 'parameters.{unknown[0]}' for merge method '{raw.merge_method}'; allowed keys are {sorted(global_keys + model_keys)}"
        )
    params = _validate(method.params, top_global, source, "parameters")
    _validate(method.model_params, top_model, source, "parameters")  # defaults must be valid on their own

    entries = list(raw.models)
    base = raw.base_model
    if base is None:
        if method is not METHODS["linear"] or not entries:
            raise MergeInputError(f"{source}: key 'base_model' is required for merge method '{raw.merge_method}'")
        base = entries[0].model  # linear needs a reference point only; the average does not depend on it
    if not method.base_may_be_a_model:
        entries = [e for e in entries if e.model != base]
    if not entries:
        raise MergeInputError(f"{source}: key 'models' must list at least one fine-tuned model besides the base '{base}'")

    model_params = []
    for k, entry in enumerate(entries):
        for key in entry.parameters:
            if key not in model_keys:
                raise MergeInputError(
                    f"{source}: unknown key 'models[{k}].parameters.{key}' for merge method '{raw.merge_method}'; allowed per-model keys are {sorted(model_keys)}"
                )
        model_params.append(_validate(method.model_params, {**top_model, **entry.parameters}, source, f"models[{k}].parameters"))

    out_dtype = _dtype(raw.out_dtype, "out_dtype", source) or _dtype(raw.dtype, "dtype", source)
    tokenizer_source = raw.tokenizer_source or "base"
    if tokenizer_source == "union":
        raise MergeInputError(f"{source}: key 'tokenizer_source': 'union' is not supported; use 'base' or a model path")
    return MergeConfig(
        raw=raw,
        method_name=raw.merge_method,
        base_model=base,
        models=tuple(e.model for e in entries),
        params=params,
        model_params=tuple(model_params),
        out_dtype=out_dtype,
        tokenizer_source=base if tokenizer_source == "base" else tokenizer_source,
    )


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, or `MergeInputError` naming the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"config file '{path}' does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeInputError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_merge_config(path: str | Path) -> MergeConfig:
    return parse_merge_config(read_yaml(path), source=str(path))
