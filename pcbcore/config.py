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
    dtype: bfloat16            # mergekit's working dtype: inputs are converted to it and merged in it
    out_dtype: bfloat16
    tokenizer_source: union    # base | union | a model: the output vocabulary (`pcbcore.tokenizer`)
    chat_template: auto        # auto | chatml | llama3 | alpaca | mistral | exaone | a Jinja template

and mergekit's other forms: `slices:` of `sources:` with `layer_range` (`pcbcore.slices`), `modules:` (a
module's own `models:` or `slices:` and `parameters`; pcbmerge merges models of one module, which mergekit
names `default`), the base listed
among `models` (with or without parameters), list-valued gradients and `filter:` conditions
(`pcbcore.gradients`, resolved per tensor), a `parameters:` that YAML reads as null, the `tokenizer:`
block (`source`, `tokens`, `pad_to_multiple_of`), and `model+lora` references (`pcbcore.lora`).

pcbmerge's own keys: PCB's `ratio`, `variant`, `scope`, `clip_quantile`; TIES's `scope`; DARE's `seed`;
per-model `lambda` (the coefficient λ_i of SPEC eq. 1, default the top-level `lambda`, default 1);
`compute_dtype` (float32 maths whatever `dtype` says); `allow_pickle`. Every key is checked: a typo is an
error that names it and lists what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pcbcore import gradients
from pcbcore.chat_templates import TEMPLATES
from pcbcore.errors import MergeInputError
from pcbcore.lines import LinesParams
from pcbcore.lora import split_reference
from pcbcore.methods import METHODS, MergeMethod
from pcbcore.methods.base import FrozenModel, ModelParams, unit_lambdas

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

# mergekit's methods built on `GeneralizedTaskArithmeticMerge`: they subtract θ_i − θ_pre in the working dtype.
ROUNDED_TASK_VECTOR_METHODS = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})

# mergekit 0.1.5's name for the one module of a single-module architecture (Llama, Mistral, Qwen2, GPT-2, BERT,
# and any it infers with one layer stack): its tensors are all of the model's, unprefixed.
DEFAULT_MODULE = "default"

# mergekit 0.1.5's architectures of several modules (its `kind: modular` definitions) and their module names.
# pcbmerge plans one layer stack per model, so it merges none of them per module (`modules:` or `slices:`).
MULTI_MODULE_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "Llama4ForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_model"),
    "Mistral3ForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "Qwen2VLForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "Qwen2_5_VLForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "Qwen3VLForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "Qwen3VLMoeForConditionalGeneration": ("text_decoder", "multi_modal_projector", "vision_tower"),
    "T5ForConditionalGeneration": ("decoder", "encoder", "shared"),
    "WhisperForConditionalGeneration": ("decoder", "encoder"),
}


def _none_is_empty(value: Any) -> Any:
    """mergekit reads `parameters:` with nothing (or only comments) under it, which YAML makes null, as no
    parameters."""
    return {} if value is None else value


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="local folder (or, in the pipeline, a Hub id or models:/ URI)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model parameters, e.g. {lambda: 1.1} or {weight: 2}")

    null_parameters = field_validator("parameters", mode="before")(_none_is_empty)


class EmbeddingSource(BaseModel):
    """Where a token's embedding row comes from when a model lacks the token (mergekit's
    `{kind: zero}` or `{kind: model_token, model, token_id | token}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero", "model_token"] = Field(description="zero: a row of zeros; model_token: a given token's row of a given model")
    model: str | None = Field(default=None, description="model_token: the model whose row is taken")
    token_id: int | None = Field(default=None, ge=0, description="model_token: the row's index in that model")
    token: str | None = Field(default=None, description="model_token: the token whose row is taken, in that model's vocabulary")

    @model_validator(mode="after")
    def _one_token(self) -> EmbeddingSource:
        if self.kind == "model_token":
            if self.model is None:
                raise ValueError("a 'model_token' source needs 'model'")
            if (self.token_id is None) == (self.token is None):
                raise ValueError("a 'model_token' source needs exactly one of 'token_id' and 'token'")
        elif self.model is not None or self.token_id is not None or self.token is not None:
            raise ValueError("a 'zero' source takes no 'model', 'token_id' or 'token'")
        return self


class TokenSetting(BaseModel):
    """One entry of `tokenizer.tokens`: the token is added to the vocabulary if missing, and its embedding
    rows come from `source` where a model lacks it (every model's, with `force`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str | EmbeddingSource | None = Field(default=None, description="a model (its row of this token), {kind: zero} or {kind: model_token, ...}")
    force: bool = Field(default=False, description="use `source`'s row in every model, even those that have the token")

    @field_validator("source", mode="before")
    @classmethod
    def _source_form(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, dict):
            try:
                return EmbeddingSource.model_validate(value)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ValueError(err.get("msg", "is invalid").removeprefix("Value error, ")) from None
        raise ValueError("must be a model, {kind: zero} or {kind: model_token, model: ..., token: ...}")


class TokenizerBlock(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary and the embeddings of tokens a model lacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(default="union", description="union (every model's tokens), base, or a model whose tokenizer is used")
    tokens: dict[str, TokenSetting] | None = Field(default=None, description="tokens to add or whose embeddings to set")
    pad_to_multiple_of: int | None = Field(default=None, ge=1, description="round the vocabulary up to a multiple of this (rows past the tokens: their mean)")


@dataclass(frozen=True)
class VocabularySpec:
    """The output vocabulary a merge builds (mergekit builds one whenever `tokenizer_source` or `tokenizer`
    is given): 'base', 'union' or a model reference, the `tokens` settings, the padding multiple."""

    source: str
    tokens: tuple[tuple[str, TokenSetting], ...] = ()
    pad_to_multiple_of: int | None = None


class SliceSource(BaseModel):
    """One input of a mergekit output slice: a model's layers [start, stop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="local folder (or, in the pipeline, a Hub id or models:/ URI)")
    layer_range: tuple[int, int] = Field(description="the model's layers [start, stop) that this slice takes")
    revision: str | None = Field(default=None, description="accepted and ignored, as mergekit ignores it here (pin a Hub revision with org/name@revision)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model parameters of this source")

    null_parameters = field_validator("parameters", mode="before")(_none_is_empty)


class OutputSlice(BaseModel):
    """A run of output layers merged from the same number of layers of each source (mergekit's slice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1, description="the models whose layers this slice merges")
    parameters: dict[str, Any] = Field(default_factory=dict, description="parameters of this slice (above the top-level ones)")
    base_model: str | None = Field(default=None, description="this slice's base (one of its sources), in place of the file's base_model, as in mergekit")
    residual_weight: float | None = Field(default=None, description="accepted and ignored, as mergekit 0.1.5 ignores it")

    null_parameters = field_validator("parameters", mode="before")(_none_is_empty)


class OutputModule(BaseModel):
    """One module of the output (mergekit's `OutputModuleDefinition`): its own `models:` or `slices:`, and
    `parameters` between the slices' and the top-level ones. `base_model`, `merge_method` and the dtypes
    are the file's, as in mergekit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[ModelEntry] | None = Field(default=None, description="the module's models, as the top-level 'models'")
    slices: list[OutputSlice] | None = Field(default=None, description="the module's layer slices, as the top-level 'slices'")
    parameters: dict[str, Any] = Field(default_factory=dict, description="parameters of this module (above the top-level ones, below a slice's)")

    null_parameters = field_validator("parameters", mode="before")(_none_is_empty)


@dataclass(frozen=True)
class SourceSpec:
    """An input of a slice, normalised: its layer range (None: all of the model's layers), its parameter
    settings and where it is written in the user's file (`models[2]`, `slices[0].sources[1]`)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict
    where: str


@dataclass(frozen=True)
class SliceSpec:
    """An output slice, normalised (a `models:` file is one slice over every layer)."""

    sources: tuple[SourceSpec, ...]
    parameters: dict
    where: str  # "" for the `models:` form
    base_model: str | None = None  # this slice's own θ_pre (mergekit's slice `base_model`; None: the file's)


class RawMergeConfig(BaseModel):
    """The YAML as written, before the method's parameters are checked. The pipeline's config extends it,
    so its field descriptions are also that form's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str = Field(description="linear | task_arithmetic | ties | dare_linear | dare_ties | pcb")
    base_model: str | None = Field(
        default=None, description="the pre-trained checkpoint: a folder (or, in the pipeline, org/name@rev on the Hub, or models:/NAME/VERSION)"
    )
    models: list[ModelEntry] = Field(default_factory=list, description="the fine-tuned checkpoints to merge, each with optional per-model parameters")
    slices: list[OutputSlice] | None = Field(default=None, description="mergekit's layer slices: output layers taken or merged from layer ranges of the models")
    modules: dict[str, OutputModule] | None = Field(
        default=None, description="mergekit's per-module merge: {default: {models | slices, parameters}} (the one module of a decoder-only model)"
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters, e.g. {ratio: 0.1} for pcb, {density: 0.5} for ties")
    dtype: str | None = Field(
        default=None, description="mergekit's working dtype: inputs are converted to it and merged in it (default: the inputs' own dtype)"
    )
    compute_dtype: str | None = Field(
        default=None, description="pcbmerge's opt-in: the dtype the maths runs in after the inputs are read in `dtype` (float32: more precise than mergekit)"
    )
    out_dtype: str | None = Field(default=None, description="dtype of the merged weights (default: the inputs' dtype)")
    tokenizer_source: str | None = Field(
        default=None, description="base | union | a model: the output vocabulary, embeddings permuted into it (default: the base's tokenizer copied)"
    )
    tokenizer: TokenizerBlock | None = Field(default=None, description="mergekit's tokenizer block: source, tokens, pad_to_multiple_of")
    chat_template: str | None = Field(default=None, description=f"auto (the inputs' most common), a name ({', '.join(sorted(TEMPLATES))}) or a Jinja template")
    allow_pickle: bool = Field(default=False, description="accept pickle checkpoints (loaded with weights_only=True)")
    name: str | None = Field(default=None, description="a name for the merge")
    lines: LinesParams | None = Field(default=None, description="LiNeS scaling of the merged task vector: α at the first layer, α+β at the last")

    null_parameters = field_validator("parameters", mode="before")(_none_is_empty)


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
    source: str = "config"  # the file the config came from, for messages
    # The merge as mergekit plans it: output slices of sources (a `models:` file is one slice).
    slices: tuple[SliceSpec, ...] = ()
    # The method needs no base and the file names none (passthrough): θ_pre = 0, so C_i = θ_i.
    zero_base: bool = False
    # mergekit's `dtype`: the inputs are converted to it (None: read as stored).
    working_dtype: torch.dtype | None = None
    # The dtype the maths rounds to: the working dtype, as in mergekit, unless `compute_dtype` asks for
    # float32 (None: float32 maths).
    round_dtype: torch.dtype | None = None
    # Whether task vectors are rounded to `round_dtype` as mergekit subtracts them (its task-arithmetic family).
    round_task_vectors: bool = False
    # Whether some parameter differs between tensors (a gradient or a filter).
    per_tensor: bool = False
    # λ_i set by `with_lambdas` (the search), above whatever the file says.
    lambda_override: tuple[float, ...] | None = None
    # The output vocabulary to build and permute the embeddings into (None: the tokenizer is copied).
    vocabulary: VocabularySpec | None = None
    # The chat template to write: 'auto' (chosen from the inputs when the merge is written) or its text.
    chat_template: str | None = None
    # The module a `modules:` file merges (None: top-level `models:` / `slices:`), and its `parameters`,
    # asked after a slice's and before the top-level ones.
    module: str | None = None
    module_parameters: dict = Field(default_factory=dict)

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.method_name]

    @property
    def sliced(self) -> bool:
        """Whether the file gives `slices:` (top-level or its module's), planned slice by slice."""
        return bool(self.raw.slices) or (self.module is not None and bool(self.raw.modules[self.module].slices))

    @property
    def models_key(self) -> str:
        """The key of the file's `models:` list, as written (`models` or `modules.default.models`)."""
        return "models" if self.module is None else f"modules.{self.module}.models"

    @property
    def components_refusal(self) -> str | None:
        """Why this merge has no components form (`MergeMethod.components_refusal`), or None."""
        method = self.method
        return method.components_refusal(self.params) if method.components_refusal else None

    @property
    def exact(self) -> bool:
        """Whether `pcbmerge merge` follows mergekit's own op order (`MergeMethod.exact`): for a file mergekit
        could run — no `compute_dtype` (pcbmerge's float32 maths), no `lines`, no λ set by the search, a
        tensor scope. Each tensor then merges in the working dtype as mergekit does, unless its parameters are
        pcbmerge's own (per-model λ_i: the method's `exact` says so by returning None)."""
        return (
            self.method.exact is not None
            and self.raw.compute_dtype is None
            and self.raw.lines is None
            and self.lambda_override is None
            and self.method.scope(self.params) == "tensor"
            and getattr(self.params, "zero_sign", "positive") == "positive"  # "majority": the TIES paper's code, pcbmerge's key
        )

    def tensor_params(self, slice_index: int, tensor_name: str, t: float, inputs: list[tuple[int | None, str, str]]) -> tuple[FrozenModel, list[ModelParams]]:
        """The method's parameters for one output tensor, resolved as mergekit resolves them: each key from
        the first source that gives a value (this model's entry in the slice, the slice's `parameters`, the
        module's, the top-level `parameters`), gradients read at `t`, filters matched against the output
        tensor's name for shared keys and against each input's tensor name for per-model keys, then the
        defaults.

        `inputs`: (index into `models` or None for the base listed as a model, model reference, the input's
        tensor name) per input model of the tensor.
        """
        if not self.per_tensor and self.lambda_override is None:
            by_model = dict(zip(self.models, self.model_params))
            if all(model in by_model for _, model, _ in inputs):
                return self.params, [by_model[model] for _, model, _ in inputs]
        spec, method = self.slices[slice_index], self.method
        shared = [spec.parameters, self.module_parameters, self.raw.parameters]
        where = f"tensor '{tensor_name}'"
        params = _resolved(self.source, where, method.params, _resolve_keys(_keys_of(method.params), shared, tensor_name, t))
        model_params = []
        for index, model, input_name in inputs:
            sources = [s.parameters for s in spec.sources if s.model == model] + shared
            values = _resolve_keys(_keys_of(method.model_params), sources, input_name, t)
            if self.lambda_override is not None and index is not None:
                values["lambda"] = self.lambda_override[index]
            model_params.append(_resolved(self.source, f"{where} of model '{model}'", method.model_params, values))
        return params, model_params

    @property
    def lambdas(self) -> list[float]:
        return [m.lambda_ for m in self.model_params]

    def with_lambdas(self, lambdas: list[float]) -> MergeConfig:
        if len(lambdas) != len(self.models):
            raise MergeInputError(f"{len(lambdas)} coefficients given for {len(self.models)} models")
        params = tuple(m.model_copy(update={"lambda_": float(x)}) for m, x in zip(self.model_params, lambdas))
        return self.model_copy(update={"model_params": params, "lambda_override": tuple(float(x) for x in lambdas)})

    def with_paths(self, resolve) -> MergeConfig:
        """The same merge with every model reference replaced by `resolve(ref)` (a local folder); a
        `model+lora` reference has its two parts resolved."""
        resolve_one = resolve

        def resolve(ref: str) -> str:
            model, lora = split_reference(ref)
            return str(resolve_one(ref)) if lora is None else f"{resolve_one(model)}+{resolve_one(lora)}"

        slices = tuple(
            SliceSpec(
                tuple(SourceSpec(str(resolve(s.model)), s.layer_range, s.parameters, s.where) for s in spec.sources),
                spec.parameters,
                spec.where,
                None if spec.base_model is None else str(resolve(spec.base_model)),
            )
            for spec in self.slices
        )
        vocabulary = self.vocabulary
        if vocabulary is not None:
            tokens = tuple((token, _resolved_setting(setting, resolve)) for token, setting in vocabulary.tokens)
            source = vocabulary.source if vocabulary.source in ("base", "union") else str(resolve(vocabulary.source))
            vocabulary = VocabularySpec(source, tokens, vocabulary.pad_to_multiple_of)
        return self.model_copy(
            update={
                "base_model": str(resolve(self.base_model)),
                "models": tuple(str(resolve(m)) for m in self.models),
                "tokenizer_source": str(resolve(self.tokenizer_source)),
                "slices": slices,
                "vocabulary": vocabulary,
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
            **({"lines": self.raw.lines.model_dump()} if self.raw.lines else {}),
        }


def _resolved_setting(setting: TokenSetting, resolve) -> TokenSetting:
    """A token setting with its model reference (if any) replaced by `resolve(ref)`."""
    source = setting.source
    if isinstance(source, str):
        return setting.model_copy(update={"source": str(resolve(source))})
    if isinstance(source, EmbeddingSource) and source.model is not None:
        return setting.model_copy(update={"source": source.model_copy(update={"model": str(resolve(source.model))})})
    return setting


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


def _validate(model: type[BaseModel], data: dict, source: str, where: str, allowed: list[str] | None = None, strip: str | None = None):
    """`model` validated from `data`; an error is one sentence naming the key under `where` (`strip`: a key
    already written out in `where`, e.g. a gradient's entry `parameters.density[1]`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        if strip is not None:
            err = {**err, "loc": tuple(p for p in err.get("loc", ()) if p != strip)}
        sentence = error_sentence(source, where, err)
        if err.get("type") == "extra_forbidden" and allowed is not None and len(err.get("loc", ())) == 1:  # `allowed`: the keys directly under `where`
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


def _resolve_keys(keys: list[str], sources: list[dict | None], tensor_name: str, t: float) -> dict[str, Any]:
    values = {}
    for key in keys:
        found, value = gradients.resolve(key, sources, tensor_name, t)
        if found:
            values[key] = value
    return values


def _resolved(source: str, where: str, model: type[BaseModel], values: dict[str, Any]):
    """`model` validated from the values resolved for one tensor (cached: most tensors share them)."""
    try:
        return _validated_cached(model, tuple(sorted(values.items())))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "is invalid").removeprefix("Value error, ")
        raise MergeInputError(f"{source}: key 'parameters.{loc}' for {where}: {msg} (got {err.get('input')!r})") from None


@lru_cache(maxsize=4096)
def _validated_cached(model: type[BaseModel], items: tuple):
    return model.model_validate(dict(items))


def _check_settings(settings: dict, where: str, source: str, method_name: str, global_keys: list[str], model_keys: list[str], per_model: bool) -> bool:
    """Check a `parameters` mapping as written (under `where`): known keys, mergekit's setting forms, and
    every scalar each setting can give valid for its key. Returns whether some setting differs per tensor."""
    method = METHODS[method_name]
    allowed = model_keys if per_model else global_keys + model_keys
    varies = False
    for key, setting in settings.items():
        if key not in allowed:
            kind = "per-model keys" if per_model else "keys"
            raise MergeInputError(f"{source}: unknown key '{where}.{key}' for merge method '{method_name}'; allowed {kind} are {sorted(allowed)}")
        why = gradients.check_setting(setting)
        if why:
            raise MergeInputError(f"{source}: key '{where}.{key}' {why} (got {setting!r})")
        varies = varies or not gradients.is_plain(setting)
        model = method.model_params if key in model_keys else method.params
        for path, leaf in gradients.leaves(setting):
            _validate(model, {key: leaf}, source, where + (f".{key}{path}" if path else ""), strip=key if path else None)
    return varies


def parse_merge_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping into a `MergeConfig`; every error names `source` and the key as the
    file writes it (an index into `models` counts the base when the file lists it there)."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: a merge config must be a YAML mapping with 'merge_method', 'base_model' and 'models'")
    module = _module_of(data, source)
    raw = _validate(RawMergeConfig, data, source, "", allowed=_keys_of(RawMergeConfig))
    if raw.merge_method not in METHODS:
        raise MergeInputError(f"{source}: unknown merge method '{raw.merge_method}'; choose one of {sorted(METHODS)}")
    method = METHODS[raw.merge_method]
    global_keys, model_keys = _keys_of(method.params), _keys_of(method.model_params)
    if raw.slices is not None and not raw.slices:
        raise MergeInputError(f"{source}: key 'slices' must list at least one slice of 'sources' with 'layer_range' (or leave it out and list 'models')")
    if raw.slices and raw.models:
        raise MergeInputError(f"{source}: keys 'models' and 'slices' are exclusive; give one of them (as in mergekit)")
    # A `modules:` file's one module holds what the top level holds otherwise (mergekit's planner turns the
    # top-level `models:` / `slices:` into that module); its keys are written out under `modules.NAME.`.
    if module is None:
        slices_in, models_in, module_parameters, prefix = raw.slices, raw.models, {}, ""
    else:
        body = raw.modules[module]
        slices_in, models_in, module_parameters, prefix = body.slices, body.models or [], body.parameters, f"modules.{module}."

    varies = _check_settings(raw.parameters, "parameters", source, raw.merge_method, global_keys, model_keys, per_model=False)
    varies |= _check_settings(module_parameters, f"{prefix}parameters", source, raw.merge_method, global_keys, model_keys, per_model=False)
    if slices_in:
        specs = []
        for k, out_slice in enumerate(slices_in):
            where = f"{prefix}slices[{k}]"
            varies |= _check_settings(out_slice.parameters, f"{where}.parameters", source, raw.merge_method, global_keys, model_keys, per_model=False)
            sources = []
            for j, src in enumerate(out_slice.sources):
                at = f"{where}.sources[{j}]"
                start, stop = src.layer_range
                if not 0 <= start < stop:
                    raise MergeInputError(f"{source}: key '{at}.layer_range' must be [start, stop) with 0 <= start < stop (got {list(src.layer_range)})")
                varies |= _check_settings(src.parameters, f"{at}.parameters", source, raw.merge_method, global_keys, model_keys, per_model=True)
                sources.append(SourceSpec(_model_ref(src.model, f"{at}.model", source), (start, stop), src.parameters, at))
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) > 1:
                raise MergeInputError(f"{source}: key '{where}.sources': every source of a slice must hold the same number of layers (got {sorted(lengths)})")
            slice_base = None if out_slice.base_model is None else _model_ref(out_slice.base_model, f"{where}.base_model", source)
            if slice_base is not None and slice_base not in {s.model for s in sources}:
                raise MergeInputError(
                    f"{source}: key '{where}.base_model': '{slice_base}' must be one of the slice's sources (mergekit takes its layers from there)"
                )
            specs.append(SliceSpec(tuple(sources), out_slice.parameters, where, slice_base))
    else:
        sources = []
        for k, entry in enumerate(models_in):
            at = f"{prefix}models[{k}]"
            varies |= _check_settings(entry.parameters, f"{at}.parameters", source, raw.merge_method, global_keys, model_keys, per_model=True)
            sources.append(SourceSpec(_model_ref(entry.model, f"{at}.model", source), None, entry.parameters, at))
        specs = [SliceSpec(tuple(sources), {}, "")]
    if varies and next((p["scope"] for p in (module_parameters, raw.parameters) if "scope" in p), None) == "model":
        raise MergeInputError(f"{source}: gradients and 'filter' parameters differ per tensor, which needs 'parameters.scope: tensor' (not model)")

    base = raw.base_model if raw.base_model is None else _model_ref(raw.base_model, "base_model", source)
    zero_base = False
    named = list(dict.fromkeys(s.model for spec in specs for s in spec.sources))
    if base is None:
        if not method.base_optional and not (method is METHODS["linear"] and named):
            raise MergeInputError(f"{source}: key 'base_model' is required for merge method '{raw.merge_method}'")
        if not method.base_optional:
            base = named[0]  # linear needs a reference point only; the average does not depend on it
        else:
            zero_base = True
    if method.base_optional and method.max_models == 1:
        zero_base = True  # one input per tensor (passthrough): a base, if named, takes no part
    if base is None:
        base = named[0] if named else ""  # only for the side files (config.json, tokenizer)
    if zero_base or method.base_may_be_a_model:
        models = named
    else:
        models = [m for m in named if m != base]
    if not models:
        raise MergeInputError(
            f"{source}: key '{prefix}{'slices' if slices_in else 'models'}' must list at least one fine-tuned model besides the base '{base}'"
        )
    if method.max_models is not None:
        for spec in specs:
            if len(spec.sources) > method.max_models:
                at = f"{spec.where}.sources" if spec.where else f"{prefix}models"
                raise MergeInputError(
                    f"{source}: key '{at}': merge method '{raw.merge_method}' takes at most {method.max_models} model per slice (got {len(spec.sources)})"
                )

    # The parameters of a tensor outside the layers, at t = 0: every tensor's, when none varies.
    # (With filters, every filter taken as matching: the representative values; each tensor's own are
    # resolved and checked when the inputs are opened.)
    representative = None if varies else ""
    params = _resolved(
        source, "the model", method.params, _resolve_keys(global_keys, [specs[0].parameters, module_parameters, raw.parameters], representative, 0.0)
    )
    model_params = []
    for model in models:
        settings = [s.parameters for spec in specs[:1] for s in spec.sources if s.model == model] + [specs[0].parameters, module_parameters, raw.parameters]
        entry_where = next((s.where for spec in specs for s in spec.sources if s.model == model), f"{prefix}models")
        values = _resolve_keys(model_keys, settings, representative, 0.0)
        try:
            model_params.append(method.model_params.model_validate(values))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise MergeInputError(error_sentence(source, f"{entry_where}.parameters", err)) from None

    out_dtype = _dtype(raw.out_dtype, "out_dtype", source) or _dtype(raw.dtype, "dtype", source)
    working = _dtype(raw.dtype, "dtype", source)
    compute = _dtype(raw.compute_dtype, "compute_dtype", source)
    if compute not in (None, torch.float32):
        raise MergeInputError(
            f"{source}: key 'compute_dtype' must be 'float32' (got {raw.compute_dtype!r}); leave it out to compute in 'dtype' as mergekit does"
        )
    round_dtype = None if compute is not None or working in (None, torch.float32, torch.float64) else working
    # mergekit's task-arithmetic family subtracts θ_i − θ_pre in the working dtype; linear (and the methods
    # on the weights themselves) compute from the converted weights in float32 and round only the result.
    round_task_vectors = round_dtype is not None and raw.merge_method in ROUNDED_TASK_VECTOR_METHODS
    vocabulary = _vocabulary(raw, source, base, named)
    # The folder whose tokenizer files the output starts from (a union starts from the base's).
    tokenizer_source = base if vocabulary is None or vocabulary.source in ("base", "union") else vocabulary.source
    config = MergeConfig(
        raw=raw,
        method_name=raw.merge_method,
        base_model=base,
        models=tuple(models),
        params=params,
        model_params=tuple(model_params),
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        source=source,
        slices=tuple(specs),
        zero_base=zero_base,
        working_dtype=working,
        round_dtype=round_dtype,
        round_task_vectors=round_task_vectors,
        per_tensor=varies,
        vocabulary=vocabulary,
        chat_template=_chat_template(raw.chat_template, source),
        module=module,
        module_parameters=module_parameters,
    )
    if config.components_refusal is not None and not (config.exact and unit_lambdas(model_params)):
        raise MergeInputError(f"{source}: {config.components_refusal}")
    return config


def _module_of(data: dict, source: str) -> str | None:
    """The module a `modules:` file merges (None: the file has no `modules`), checked as written: exclusive
    with the top-level `models` / `slices`, one module that pcbmerge can merge, and that module's own
    `models` or `slices` (exactly one of them, as mergekit requires)."""
    if "modules" not in data:
        return None
    for key in ("models", "slices"):
        if data.get(key):
            raise MergeInputError(f"{source}: keys 'modules' and '{key}' are exclusive; give one of them (as in mergekit)")
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        raise MergeInputError(
            f"{source}: key 'modules' must map the module '{DEFAULT_MODULE}' to its 'models' or 'slices' (or leave it out and list 'models' or 'slices')"
        )
    for name, body in modules.items():
        key = f"modules.{name}"
        if name != DEFAULT_MODULE:
            owners = sorted(arch for arch, names in MULTI_MODULE_ARCHITECTURES.items() if name in names)
            if owners:
                raise MergeInputError(
                    f"{source}: key '{key}' names a module of mergekit's multi-module architectures ({', '.join(owners)}), which pcbmerge cannot merge "
                    f"per module; the one module pcbmerge merges is '{DEFAULT_MODULE}' (all of a Llama, Mistral, Qwen2 or other single-module model)"
                )
            raise MergeInputError(
                f"{source}: key '{key}' names an unknown module; the one module pcbmerge merges is '{DEFAULT_MODULE}' "
                "(all of a Llama, Mistral, Qwen2 or other single-module model, as mergekit names it)"
            )
        if not isinstance(body, dict):
            raise MergeInputError(f"{source}: key '{key}' must be a mapping with 'models' or 'slices' (and optional 'parameters')")
        module = _validate(OutputModule, body, source, key, allowed=_keys_of(OutputModule))
        if bool(module.models) == bool(module.slices):
            if module.models:
                raise MergeInputError(f"{source}: keys '{key}.models' and '{key}.slices' are exclusive; give one of them (as in mergekit)")
            raise MergeInputError(f"{source}: key '{key}' must list its 'models' or its 'slices' (as in mergekit)")
    return DEFAULT_MODULE


def _vocabulary(raw: RawMergeConfig, source: str, base: str, named: list[str]) -> VocabularySpec | None:
    """The output vocabulary the file asks for (`tokenizer_source` or the `tokenizer` block), checked:
    every model a token's embedding comes from must be one of the merge's models."""
    if raw.tokenizer_source is not None and raw.tokenizer is not None:
        raise MergeInputError(f"{source}: keys 'tokenizer_source' and 'tokenizer' are exclusive; give one of them (as in mergekit)")
    if raw.tokenizer is None:
        if raw.tokenizer_source is None:
            return None
        return VocabularySpec(_model_ref(raw.tokenizer_source, "tokenizer_source", source))
    block = raw.tokenizer
    models = [base, *named]
    tokens = tuple((block.tokens or {}).items())
    for token, setting in tokens:
        ref = setting.source.model if isinstance(setting.source, EmbeddingSource) else setting.source
        if ref is not None and ref not in models:
            raise MergeInputError(f"{source}: key 'tokenizer.tokens.{token}.source' names model {ref!r}, which the merge does not use; use one of {models}")
    return VocabularySpec(_model_ref(block.source, "tokenizer.source", source), tokens, block.pad_to_multiple_of)


def _chat_template(value: str | None, source: str) -> str | None:
    """mergekit's `chat_template`: 'auto', a template name, or a Jinja template given inline."""
    if value is None or value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value and value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise MergeInputError(f"{source}: key 'chat_template' must be 'auto', one of {sorted(TEMPLATES)} or a Jinja template (got {value!r})")
    return value


def _model_ref(ref: str, key: str, source: str) -> str:
    """A model reference: a model, or mergekit's `model+lora` (the LoRA applied as the model is read)."""
    try:
        split_reference(ref)
    except MergeInputError as exc:
        raise MergeInputError(f"{source}: key '{key}': {exc}") from None
    return ref


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
