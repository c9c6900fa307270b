"""`watch_flow`'s parameter model, and reading one from a pipeline YAML plus a source.

The YAML is the pipeline's own (`pcbmerge run` or `pcbmerge search` format); its `models` list may be
empty or absent, since the watched source supplies the checkpoints. Entries it does list keep their
per-model `parameters` for the checkpoint with the same ref or folder name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pcbcore.errors import MergeInputError
from pipeline.config import PipelineConfig, parse_pipeline_config, read_config_yaml
from pipeline.forms import optional_block_check, optional_block_schema
from pipeline.search_config import SearchSettings, parse_search_config

PLACEHOLDERS = [{"model": "<from the watched source>"}, {"model": "<from the watched source, 2>"}]


def watch_form(schema: dict, cls: type | None = None) -> None:
    """The optional `search` block rendered as its fields, and checked at each of them."""
    schema["properties"]["search"] = optional_block_schema(SearchSettings, schema["properties"]["search"]["description"])
    schema["dependentSchemas"] = {"search": optional_block_check("search", SearchSettings)}


class WatchConfig(BaseModel):
    """What to watch and the pipeline to run on what it holds (its `models` list is taken from the source)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=watch_form)

    source: str = Field(
        description="a folder whose sub-folders are checkpoints, a Hub repo id org/name (one checkpoint per branch), "
        "or models:/NAME (one per registered version)"
    )
    pipeline: PipelineConfig = Field(description="the merge to run; `register_as` is required, `models` is replaced by the source's checkpoints")
    search: SearchSettings | None = Field(default=None, description="search the coefficients with CMA-ES (search_flow) instead of a plain merge")
    min_models: int = Field(default=2, ge=1, description="merge only when the source holds at least this many checkpoints")


def load_watch_config(path: str | Path, source: str) -> WatchConfig:
    """Read a pipeline (or search) YAML for watching `source`; errors name the file and key."""
    data = read_config_yaml(path)
    if not isinstance(data, dict):
        raise MergeInputError(f"{path}: a pipeline config must be a YAML mapping with 'merge_method' and 'base_model'")
    listed = data.get("models") or []
    checked = {**data, "models": listed if len(listed) >= 2 else PLACEHOLDERS}
    search = None
    if "search" in data:
        # a search's `start` list is per model; with models from a source only a single start value makes sense
        search = parse_search_config(checked, source=str(path)).search
        checked.pop("search")
    pipeline = parse_pipeline_config(checked, source=str(path))
    pipeline = PipelineConfig.model_validate({**pipeline.model_dump(), "models": listed})
    if not pipeline.register_as:
        raise MergeInputError(f"{path}: a watch needs key 'register_as': the last merge's inputs are read from that registered model")
    return WatchConfig(source=str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else source, pipeline=pipeline, search=search)
