"""The pipeline's config: a mergekit-style merge YAML plus `evaluation:`, `register_as:` and a few run keys.

    merge_method: pcb
    base_model: path/or/org/name@rev        # a folder, a Hub id, or models:/NAME/VERSION | models:/NAME@alias
    models:
      - model: models:/my-merge/2
      - model: org/expert-b
      - model: org/base+path/to/lora        # model+lora: both fetched and fingerprinted, the adapter applied as read
    parameters: {ratio: 0.1}
    evaluation:
      tasks: [zoo_reverse, zoo_sort]
      include_path: path/to/tasks           # folder of lm-eval task YAMLs (optional)
      split: test                           # validation | test
      limit: 50                             # examples per task (optional)
      baselines: true                       # also score the base and every input model
    register_as: my-merge                   # MLflow registered model name (optional)
    output: merged/my-merge                 # output folder (optional; default: a content-keyed cache folder)

`PipelineConfig` is the parameter model of `merge_flow`, so the Prefect UI renders it as a form and
deployment values are validated. The merge keys are checked by `pcbcore.config.parse_merge_config`, so a
typo anywhere is one sentence naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pcbcore.config import MergeConfig, RawMergeConfig, error_sentence, parse_merge_config, read_yaml
from pcbcore.errors import MergeInputError
from pipeline.forms import (
    MethodName,
    check_parameters,
    method_dependent_schema,
    method_parameters_schema,
    model_entry_schema,
    optional_block_check,
    optional_block_schema,
)

MERGE_KEYS = tuple(RawMergeConfig.model_fields)
REGISTRY_NAME_FORBIDS = ("/", "@", ":", ".", "%", '"', "'")


class EvaluationConfig(BaseModel):
    """Which lm-eval tasks score the merged model (and, with `baselines`, the base and every input)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(min_length=1, description="lm-eval task names")
    include_path: str | None = Field(default=None, description="folder of extra lm-eval task YAMLs")
    split: Literal["validation", "test"] = Field(default="test", description="the split the scores are reported on")
    limit: int | None = Field(default=None, gt=0, description="at most this many examples per task")
    baselines: bool = Field(default=False, description="also evaluate the base and every input model")
    batch_size: int = Field(default=16, gt=0, description="lm-eval batch size")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="precision to score in (auto: the checkpoint's; float32 scores a bf16 merge without bf16 arithmetic)"
    )
    apply_chat_template: bool | str = Field(default=False, description="lm-eval: wrap prompts in the tokenizer's chat template (or the named one)")
    fewshot_as_multiturn: bool = Field(default=True, description="lm-eval: with a chat template, few-shot examples as a multi-turn conversation")


def pipeline_form(schema: dict[str, Any], cls: type | None = None) -> None:
    """The form of a pipeline config (`pipeline.forms`): `merge_method` a select, typed per-method
    `parameters` and per-model keys, and the strict checks that name the field at fault."""
    properties = schema["properties"]
    properties["parameters"] = method_parameters_schema()
    properties["models"] = model_entry_schema(properties["models"]["description"])
    properties["evaluation"] = optional_block_schema(EvaluationConfig, properties["evaluation"]["description"])
    schema["dependentSchemas"] = {"merge_method": method_dependent_schema(), "evaluation": optional_block_check("evaluation", EvaluationConfig)}


class PipelineConfig(RawMergeConfig):
    """One merge run: what to merge and how (mergekit keys), how to score it, where to register it."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=pipeline_form)

    merge_method: MethodName = Field(description="the merge method: " + " | ".join(MethodName.__args__))
    name: str | None = Field(default=None, description="a name for the MLflow run (default: register_as or the method)")
    evaluation: EvaluationConfig | None = Field(default=None, description="lm-eval tasks that score the merge (optional)")
    register_as: str | None = Field(default=None, description="MLflow registered model name")
    experiment: str = Field(default="pcbmerge", description="MLflow experiment name")
    output: str | None = Field(default=None, description="output folder (default: content-keyed cache folder)")
    overwrite: bool = Field(default=False, description="replace an existing output folder made by another merge")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, data: Any) -> Any:
        # A config from a form or the API: its relative local paths are taken from the working folder.
        return absolute_paths(data) if isinstance(data, dict) else data

    @field_validator("parameters")
    @classmethod
    def _method_parameters(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        check_parameters(info.data.get("merge_method"), value)
        return value

    @field_validator("register_as")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        # '@' would read as an alias in models:/NAME@alias; the rest MLflow refuses in a logged model's name,
        # which would fail the run only at its last step, after the merge and the evaluations.
        if value is not None and (not value.strip() or any(c in value for c in REGISTRY_NAME_FORBIDS)):
            raise ValueError(f"must be a non-empty name without any of {' '.join(REGISTRY_NAME_FORBIDS)}")
        return value

    def merge_data(self) -> dict[str, Any]:
        """The mergekit part of the config, as a plain mapping (for `parse_merge_config` and artifacts)."""
        data = self.model_dump(include=set(MERGE_KEYS), exclude_none=True, exclude_defaults=False)
        data["models"] = [m.model_dump() for m in self.models]
        return data

    def merge_config(self, source: str = "config") -> MergeConfig:
        """The validated merge (references as given, not yet fetched)."""
        return parse_merge_config(self.merge_data(), source=source)

    def references(self) -> list[str]:
        """Every checkpoint reference to fetch, base first, each once (a tokenizer source too). A `model+lora`
        reference is two: its model and its LoRA adapter, each fetched and fingerprinted on its own."""
        config = self.merge_config()
        refs = [part for ref in (config.base_model, *config.models, config.tokenizer_source) for part in reference_parts(ref)]
        return list(dict.fromkeys(refs))


def reference_parts(ref: str) -> list[str]:
    """The checkpoints a model reference names: the model, then its LoRA adapter for `model+lora`."""
    from pcbcore.lora import split_reference

    model, lora = split_reference(ref)
    return [model] if lora is None else [model, lora]


def parse_pipeline_config(data: Any, source: str = "config") -> PipelineConfig:
    """Validate a mapping into a `PipelineConfig`; errors name `source` and the key at fault."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: a pipeline config must be a YAML mapping with 'merge_method', 'base_model' and 'models'")
    merge_part = {k: v for k, v in data.items() if k in MERGE_KEYS}
    parse_merge_config(merge_part, source=source)  # the merge keys' own, precise messages first
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        # A misspelt key usually also leaves a required one missing: name the misspelling first.
        err = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")[0]
        sentence = error_sentence(source, "", err)
        if err.get("type") == "extra_forbidden":
            nested = len(err.get("loc", ())) > 1
            sentence += f"; allowed keys are {sorted((EvaluationConfig if nested else PipelineConfig).model_fields)}"
        raise MergeInputError(sentence) from None
    return config


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML; relative local paths resolve against the working folder, else the YAML's."""
    return parse_pipeline_config(read_config_yaml(path), source=str(path))


def read_config_yaml(path: str | Path) -> Any:
    """A pipeline, search or watch YAML as data, its relative local paths made absolute (`absolute_paths`)."""
    data = read_yaml(path)
    return absolute_paths(data, Path(path).parent.resolve()) if isinstance(data, dict) else data


# `tokenizer_source` words that are not paths.
TOKENIZER_WORDS = ("base", "union")


def absolute_paths(data: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """Every local path of a config as an absolute path, so lineage, cache keys and the watch name a folder
    the same way whatever the working folder.

    A reference that names an existing file or folder — from the working folder, else from `root` (the
    YAML's folder) — becomes absolute; anything else is left as written: a Hub id `org/name`, a `models:/`
    URI, or a path that does not exist (refused later with its own message). `output` is a folder to
    create, so a relative one is taken from the working folder, as it was before it was made absolute."""

    def anchor_one(ref: Any) -> Any:
        if not isinstance(ref, str) or not ref or ref.startswith("models:/"):
            return ref
        path = Path(ref).expanduser()
        if path.is_absolute():
            return str(path)
        for candidate in (path, *([root / path] if root is not None else [])):
            if candidate.exists():
                return str(candidate.resolve())
        return ref

    def anchor(ref: Any) -> Any:
        # `model+lora`: each part on its own (unless a folder of that whole name exists, as `split_reference` reads it)
        parts = ref.split("+") if isinstance(ref, str) else []
        if len(parts) == 2 and all(parts) and not any(p.exists() for p in (Path(ref).expanduser(), *([root / ref] if root is not None else []))):
            return "+".join(str(anchor_one(part)) for part in parts)
        return anchor_one(ref)

    data = dict(data)
    if "base_model" in data:
        data["base_model"] = anchor(data["base_model"])
    if data.get("tokenizer_source") not in TOKENIZER_WORDS:
        data["tokenizer_source"] = anchor(data.get("tokenizer_source"))
        if data["tokenizer_source"] is None:
            del data["tokenizer_source"]
    if isinstance(data.get("tokenizer"), dict):
        data["tokenizer"] = _anchored_tokenizer_block(data["tokenizer"], anchor)

    def anchor_inputs(part: dict[str, Any]) -> dict[str, Any]:
        # `models` and `slices`, at the top level or in a module of `modules`
        part = dict(part)
        if isinstance(part.get("models"), list):
            part["models"] = [{**m, "model": anchor(m.get("model"))} if isinstance(m, dict) else m for m in part["models"]]
        if isinstance(part.get("slices"), list):
            part["slices"] = [
                {**s, "sources": [{**src, "model": anchor(src.get("model"))} if isinstance(src, dict) else src for src in s["sources"]]}
                if isinstance(s, dict) and isinstance(s.get("sources"), list)
                else s
                for s in part["slices"]
            ]
        return part

    data = anchor_inputs(data)
    if isinstance(data.get("modules"), dict):
        data["modules"] = {name: anchor_inputs(body) if isinstance(body, dict) else body for name, body in data["modules"].items()}
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("include_path"), str):
        data["evaluation"] = {**evaluation, "include_path": anchor(evaluation["include_path"])}
    if isinstance(data.get("output"), str) and data["output"]:
        data["output"] = str(Path(data["output"]).expanduser().resolve())
    return data


def _anchored_tokenizer_block(block: dict[str, Any], anchor) -> dict[str, Any]:
    """The `tokenizer:` block with its model references anchored as the models are, so a token's `source`
    still names one of the merge's models."""
    block = dict(block)
    if isinstance(block.get("source"), str) and block["source"] not in TOKENIZER_WORDS:
        block["source"] = anchor(block["source"])
    if isinstance(block.get("tokens"), dict):
        tokens = {}
        for token, setting in block["tokens"].items():
            source = setting.get("source") if isinstance(setting, dict) else None
            if isinstance(source, str):
                setting = {**setting, "source": anchor(source)}
            elif isinstance(source, dict) and isinstance(source.get("model"), str):
                setting = {**setting, "source": {**source, "model": anchor(source["model"])}}
            tokens[token] = setting
        block["tokens"] = tokens
    return block
