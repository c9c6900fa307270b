"""The pipeline's config: a mergekit-style merge YAML plus `evaluation:`, `register_as:` and a few run keys.

    merge_method: pcb
    base_model: path/or/org/name@rev        # a folder, a Hub id, or models:/NAME/VERSION | models:/NAME@alias
    models:
      - model: models:/my-merge/2
      - model: org/expert-b
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pcbcore.config import MergeConfig, RawMergeConfig, error_sentence, parse_merge_config, read_yaml
from pcbcore.errors import MergeInputError

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


class PipelineConfig(RawMergeConfig):
    """One merge run: what to merge and how (mergekit keys), how to score it, where to register it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="a name for the MLflow run (default: register_as or the method)")
    evaluation: EvaluationConfig | None = Field(default=None, description="lm-eval tasks that score the merge (optional)")
    register_as: str | None = Field(default=None, description="MLflow registered model name")
    experiment: str = Field(default="pcbmerge", description="MLflow experiment name")
    output: str | None = Field(default=None, description="output folder (default: content-keyed cache folder)")
    overwrite: bool = Field(default=False, description="replace an existing output folder made by another merge")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")

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
        """Every checkpoint reference to fetch, base first, each once (a tokenizer source too)."""
        config = self.merge_config()
        refs = [config.base_model, *config.models, config.tokenizer_source]
        return list(dict.fromkeys(refs))


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
    """Read and validate a pipeline YAML; relative local model paths resolve against the YAML's folder."""
    return parse_pipeline_config(read_config_yaml(path), source=str(path))


def read_config_yaml(path: str | Path) -> Any:
    """A pipeline, search or watch YAML as data, its relative local model paths resolved against its folder."""
    data = read_yaml(path)
    return _anchor_local_paths(data, Path(path).parent.resolve()) if isinstance(data, dict) else data


def _anchor_local_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Relative references that name an existing folder beside the config become absolute paths."""

    def anchor(ref: Any) -> Any:
        if not isinstance(ref, str) or ref.startswith("models:/") or Path(ref).expanduser().is_absolute():
            return ref
        beside = root / ref
        return str(beside) if beside.exists() and not Path(ref).exists() else ref

    data = dict(data)
    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = anchor(data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [{**m, "model": anchor(m.get("model"))} if isinstance(m, dict) else m for m in data["models"]]
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("include_path"), str):
        data["evaluation"] = {**evaluation, "include_path": anchor(evaluation["include_path"])}
    return data
