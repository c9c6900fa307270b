"""The search's config: a pipeline config (`pipeline.config`) plus a `search:` block.

    merge_method: pcb
    base_model: zoo/base
    models: [{model: zoo/expert-reverse}, {model: zoo/expert-sort}]
    parameters: {ratio: 0.1}
    evaluation:                     # the tasks that make the fitness; `split` is the FINAL report's split
      tasks: [zoo_reverse, zoo_sort]
      include_path: zoo/tasks
      split: test
    search:
      budget: 24                    # max candidate evaluations (over all rounds and ratios)
      popsize: 6                    # candidates per round (default: cma's 4 + ⌊3 ln n⌋)
      bounds: [0.5, 1.5]            # every λ_i stays inside
      sigma0: 0.2                   # CMA-ES initial step size
      start: 1.0                    # λ at the start (one value, or one per model)
      seed: 0
      split: validation             # the fitness split; the test split is never searched on
      limit: 32                     # examples per task for the fitness (default: evaluation.limit)
      weights: {zoo_reverse: 2.0}   # weighted mean of task scores (default: equal weights)
      ratio: [0.05, 0.1, 0.2]       # PCB only: search λ for each kept fraction r, keep the best
      layer_groups: 2               # one λ per model per block of layers (embeddings go with the first
                                    # block, the final norm and head with the last): genome groups × models
      workers: 2                    # candidates evaluated at once (threads) unless Dask is asked
      dask_workers: 2               # or: a local Dask cluster with this many worker processes
      dask_address: tcp://host:8786 # or: an existing Dask scheduler
    register_as: my-searched-merge

`SearchPipelineConfig` is `search_flow`'s parameter model (the Prefect UI renders it as a form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pcbcore.errors import MergeInputError
from pipeline.config import PipelineConfig, parse_pipeline_config, pipeline_form, read_config_yaml
from pipeline.forms import block_check, block_schema


class SearchSettings(BaseModel):
    """The `search:` block: CMA-ES over the per-model coefficients λ_i of eq. (1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: int = Field(default=24, ge=1, description="max candidate evaluations in all")
    popsize: int | None = Field(default=None, ge=2, description="candidates per round (default: 4 + ⌊3 ln n⌋)")
    bounds: tuple[float, float] = Field(default=(0.5, 1.5), description="[lo, hi] for every λ_i")
    sigma0: float = Field(default=0.2, gt=0, description="CMA-ES initial step size")
    start: float | list[float] = Field(default=1.0, description="start λ: one value or one per model")
    seed: int = Field(default=0, ge=0, description="CMA-ES seed (same seed, same search)")
    split: str = Field(default="validation", description="the split the fitness is measured on")
    limit: int | None = Field(default=None, gt=0, description="examples per task for the fitness (default: evaluation.limit)")
    weights: dict[str, float] | None = Field(default=None, description="task -> weight of the fitness mean")
    ratio: list[float] | None = Field(default=None, min_length=1, description="PCB only: a grid of kept fractions r")
    layer_groups: int = Field(default=1, ge=1, description="one λ per model per contiguous block of layers (genome: groups × models)")
    workers: int = Field(default=2, ge=1, description="candidates evaluated at once on local threads")
    dask_workers: int | None = Field(default=None, ge=1, description="run candidates on a local Dask cluster of this many processes")
    dask_address: str | None = Field(default=None, description="run candidates on the Dask scheduler at this address")

    @field_validator("split")
    @classmethod
    def _validation_only(cls, value: str) -> str:
        # The authors' NLP scripts searched on the test split; that leaks the report's data into λ.
        if value != "validation":
            raise ValueError("must be 'validation': the search never sees the test split (evaluation.split is the final report's split)")
        return value

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError("must be [lo, hi] with lo < hi")
        return value

    @field_validator("ratio")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if any(not 0 < r <= 1 for r in value):
                raise ValueError("every ratio must satisfy 0 < r ≤ 1")
            if len(set(value)) != len(value):
                raise ValueError("ratios repeat")
        return value

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and (any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values())):
            raise ValueError("weights must be ≥ 0 with at least one > 0")
        return value

    @model_validator(mode="after")
    def _one_runner(self) -> SearchSettings:
        if self.dask_workers is not None and self.dask_address is not None:
            raise ValueError("give dask_workers (a local cluster) or dask_address (an existing one), not both")
        lo, hi = self.bounds
        starts = self.start if isinstance(self.start, list) else [self.start]
        if any(not lo <= s <= hi for s in starts):
            raise ValueError(f"start {self.start} must lie inside bounds [{lo}, {hi}]")
        return self

    def identity(self) -> dict[str, Any]:
        """What decides the search's path (not its length, where it runs, or which other ratios the grid
        holds: each ratio's search is keyed by its own ratio): keys its saved state."""
        return self.model_dump(mode="json", exclude={"budget", "workers", "dask_workers", "dask_address", "ratio"})


def search_form(schema: dict[str, Any], cls: type | None = None) -> None:
    """The pipeline's form plus the `search:` block, each of its fields checked where it stands."""
    pipeline_form(schema, cls)
    schema["properties"]["search"] = block_schema(SearchSettings, schema["properties"]["search"]["description"])
    schema["dependentSchemas"]["search"] = block_check("search", SearchSettings)


class SearchPipelineConfig(PipelineConfig):
    """A pipeline config whose λ are searched: `search_flow`'s parameter model."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=search_form)

    search: SearchSettings = Field(default_factory=SearchSettings, description="CMA-ES settings: budget, population, bounds, seed, where candidates run")

    def ratios(self) -> list[float | None]:
        """The PCB ratio grid, or `[None]`: search the config's own parameters once."""
        return list(self.search.ratio) if self.search.ratio else [None]


def parse_search_config(data: Any, source: str = "config") -> SearchPipelineConfig:
    """Validate a mapping into a `SearchPipelineConfig`; errors name `source` and the key at fault."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: a search config must be a YAML mapping with 'merge_method', 'base_model', 'models' and 'evaluation'")
    data = dict(data)
    search_data = data.pop("search", None) or {}
    pipeline = parse_pipeline_config(data, source=source)  # every other key, with the pipeline's own messages
    if not isinstance(search_data, dict):
        raise MergeInputError(f"{source}: key 'search' must be a mapping of search settings")
    try:
        search = SearchSettings.model_validate(search_data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(["search", *(str(p) for p in err.get("loc", ()))])
        if err.get("type") == "extra_forbidden":
            raise MergeInputError(f"{source}: unknown key '{key}'; allowed keys are {sorted(SearchSettings.model_fields)}") from None
        given = err.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        raise MergeInputError(f"{source}: key '{key}': {err.get('msg', 'is invalid').removeprefix('Value error, ')}{shown}") from None
    if pipeline.evaluation is None:
        raise MergeInputError(f"{source}: a search needs an 'evaluation' block: its tasks make the fitness")
    n_models = len(pipeline.models)
    if isinstance(search.start, list) and len(search.start) != n_models:
        raise MergeInputError(f"{source}: key 'search.start' has {len(search.start)} values for {n_models} models")
    if search.weights is not None:
        unknown = sorted(set(search.weights) - set(pipeline.evaluation.tasks))
        if unknown:
            raise MergeInputError(f"{source}: key 'search.weights' names {unknown}, which are not in evaluation.tasks {pipeline.evaluation.tasks}")
    refusal = pipeline.merge_config(source).components_refusal
    if refusal is not None:  # a search's candidates are the components form
        raise MergeInputError(f"{source}: {refusal}")
    if search.ratio is not None and pipeline.merge_method != "pcb":
        raise MergeInputError(f"{source}: key 'search.ratio' is a grid over PCB's ratio, but merge_method is '{pipeline.merge_method}'")
    return SearchPipelineConfig(**{name: getattr(pipeline, name) for name in PipelineConfig.model_fields}, search=search)


def load_search_config(path: str | Path) -> SearchPipelineConfig:
    """Read and validate a search YAML; relative local model paths resolve against the YAML's folder."""
    return parse_search_config(read_config_yaml(path), source=str(path))
