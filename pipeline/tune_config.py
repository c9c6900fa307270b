"""The tuner's config: the inputs and evaluation of a pipeline config (`pipeline.config`) plus a `tune:` block.

    base_model: zoo/base
    models: [{model: zoo/expert-reverse}, {model: zoo/expert-sort}]
    evaluation:                      # its tasks make the fitness; `split` is the split the choices are reported on
      tasks: [zoo_reverse, zoo_sort]
      include_path: zoo/tasks
      split: test
    tune:
      methods:                       # default: task_arithmetic, ties, dare_ties, pcb (paper), pcb (release)
        - task_arithmetic            # a registered method's name: its default setting and grid
        - method: pcb
          label: pcb (release)
          parameters: {variant: release}          # fixed, not tuned
          grid: {ratio: [0.05, 0.1, 0.2], lambda: [0.8, 1.0, 1.5, 2.2]}
          default: {ratio: 0.1, lambda: 1.0}      # the setting used without tuning (always in the grid)
      budget: 36                     # evaluations per method on the search slice: its grid, then CMA-ES
      limit: 50                      # examples per task of the search slice (default: evaluation.limit)
      top_k: 3                       # candidates per method re-scored on more validation data
      rescore_limit: null            # examples per task of the re-scoring (default: the whole split)
      bounds: [0.5, 1.5]             # CMA-ES bounds of every λ_i, as multiples of the grid's best λ
      sigma0: 0.2                    # CMA-ES step, as a multiple of the grid's best λ
    register_as: my-tuned-merge      # the winner's registered name

The protocol is the PCB paper's (first a grid over the method's own hyper-parameters and one uniform λ on
validation data, then CMA-ES over per-model λ_i from the best grid point), applied to every method with the
same budget, plus a re-scoring of each method's top candidates on more validation data before the choice:
the best of many noisy scores is optimistic. Only each method's choice is scored on the test split.

`TunePipelineConfig` is `tune_flow`'s parameter model (the Prefect UI renders it as a form).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pcbcore.errors import MergeInputError
from pcbcore.methods import METHODS
from pipeline.config import PipelineConfig, parse_pipeline_config, read_config_yaml

LAMBDA = "lambda"  # the uniform coefficient of the grid; per model λ_i in CMA-ES

# Default settings and grids, from each method's paper. The default is what a user gets without tuning: the
# settings the papers recommend for a handful of tasks (task arithmetic's λ is the usual 0.3–0.5 of Ilharco
# et al.; TIES keeps the top 20 % at λ = 1; DARE-TIES keeps half, as in mergekit's examples; PCB keeps
# r = 0.1 at λ = 1). The grids span the papers' own sweeps: PCB's merge is a weighted *mean* of task
# vectors, so its good λ is often well above 1 (the authors' scripts sweep λ 0.8–2.2 and r 0.05–0.2).
DEFAULT_TUNING: dict[str, tuple[dict[str, float], dict[str, list[float]]]] = {
    "task_arithmetic": ({LAMBDA: 0.4}, {LAMBDA: [0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]}),
    "ties": ({"density": 0.2, LAMBDA: 1.0}, {"density": [0.1, 0.2, 0.3, 0.5], LAMBDA: [0.8, 1.0, 1.2, 1.5]}),
    "dare_ties": ({"density": 0.5, LAMBDA: 1.0}, {"density": [0.1, 0.3, 0.5, 0.7], LAMBDA: [0.8, 1.0, 1.2, 1.5]}),
    "dare_linear": ({"density": 0.5, LAMBDA: 1.0}, {"density": [0.1, 0.3, 0.5, 0.7], LAMBDA: [0.8, 1.0, 1.2, 1.5]}),
    "pcb": ({"ratio": 0.1, LAMBDA: 1.0}, {"ratio": [0.05, 0.1, 0.15, 0.2], LAMBDA: [0.8, 1.0, 1.2, 1.5, 1.8, 2.2]}),
    # The subspace methods' overall scale α is linear in their components (C_i ∝ α), so the uniform λ is
    # their α: α stays at the papers' 1.0 and λ is gridded, without recomputing any SVD per grid point.
    "tsv": ({LAMBDA: 1.0}, {LAMBDA: [0.5, 0.75, 1.0, 1.25, 1.5]}),
    "iso_c": ({LAMBDA: 1.0}, {LAMBDA: [0.5, 0.75, 1.0, 1.25, 1.5]}),
    "iso_cts": ({LAMBDA: 1.0}, {LAMBDA: [0.5, 0.75, 1.0, 1.25, 1.5]}),
    # CART's α (the authors' "prior", 2.0) scales only the low-rank centred part, λ the whole merge
    # (average included), so α is a grid key of its own.
    "cart": ({"alpha": 2.0, LAMBDA: 1.0}, {"alpha": [1.0, 1.5, 2.0, 2.5, 3.0], LAMBDA: [0.8, 1.0, 1.2]}),
    # Consensus masks sit on task arithmetic or TIES: the underlying method's default and grid (the paper
    # tunes their coefficient as for the method itself); k and λ_m stay at their defaults.
    "consensus_ta": ({LAMBDA: 0.4}, {LAMBDA: [0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]}),
    "consensus_ties": ({"density": 0.2, LAMBDA: 1.0}, {"density": [0.1, 0.2, 0.3, 0.5], LAMBDA: [0.8, 1.0, 1.2, 1.5]}),
}
# Any other registered method: its registry defaults, and a grid over λ alone.
GENERIC_TUNING: tuple[dict[str, float], dict[str, list[float]]] = ({LAMBDA: 1.0}, {LAMBDA: [0.5, 0.75, 1.0, 1.25, 1.5]})

DEFAULT_METHODS: list[dict[str, Any]] = [
    {"method": "task_arithmetic"},
    {"method": "ties"},
    {"method": "dare_ties"},
    {"method": "pcb", "label": "pcb (paper)", "parameters": {"variant": "paper"}},
    {"method": "pcb", "label": "pcb (release)", "parameters": {"variant": "release"}},
]


def tunable_keys(method: str) -> set[str]:
    """The keys a grid may vary: λ and every parameter of the method (top-level or per model)."""
    found = METHODS[method]
    keys = {LAMBDA}
    for model in (found.params, found.model_params):
        keys |= {field.alias or name for name, field in model.model_fields.items()}
    return keys


class TuneMethod(BaseModel):
    """One method to tune: its fixed parameters, the grid of stage 1 and its default setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="a registered merge method")
    label: str | None = Field(default=None, description="its row in the leaderboard (default: the method, with its variant)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="fixed parameters of the method (not tuned)")
    grid: dict[str, list[float]] | None = Field(default=None, description="key -> values of stage 1's grid (default: the method's)")
    default: dict[str, float] | None = Field(default=None, description="the setting used without tuning; always part of the grid")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; choose one of {sorted(METHODS)}")
        return value

    @model_validator(mode="after")
    def _grid_keys(self) -> TuneMethod:
        allowed = tunable_keys(self.method)
        for where, keys in (("grid", self.grid or {}), ("default", self.default or {})):
            unknown = sorted(set(keys) - allowed)
            if unknown:
                raise ValueError(f"{where} names {unknown}, which {self.method} does not have; allowed keys are {sorted(allowed)}")
        for key, values in (self.grid or {}).items():
            if not values:
                raise ValueError(f"grid.{key} is empty")
            if len(set(values)) != len(values):
                raise ValueError(f"grid.{key} repeats values {values}")
        if self.grid is not None and LAMBDA in self.grid and any(v <= 0 for v in self.grid[LAMBDA]):
            raise ValueError("grid.lambda values must be > 0 (CMA-ES searches around the best one)")
        fixed = sorted(set(self.parameters) & (set(self.grid or {}) | set(self.default or {})))
        if fixed:
            raise ValueError(f"{fixed} are both fixed (parameters) and tuned (grid or default)")
        return self

    def name(self) -> str:
        if self.label:
            return self.label
        variant = self.parameters.get("variant")
        return f"{self.method} ({variant})" if variant else self.method

    def default_setting(self) -> dict[str, float]:
        """The default setting: the config's, else the method's (λ always present)."""
        setting, _ = DEFAULT_TUNING.get(self.method, GENERIC_TUNING)
        chosen = dict(self.default) if self.default is not None else {k: v for k, v in setting.items() if self.grid is None or k in self.grid}
        chosen.setdefault(LAMBDA, setting.get(LAMBDA, 1.0))
        return chosen

    def full_grid(self) -> dict[str, list[float]]:
        """The grid with the default setting's values added where missing (sorted), λ last."""
        _, grid = DEFAULT_TUNING.get(self.method, GENERIC_TUNING)
        grid = {k: list(v) for k, v in (self.grid if self.grid is not None else grid).items()}
        for key, value in self.default_setting().items():
            values = grid.setdefault(key, [])
            if value not in values:
                values.append(value)
        ordered = {k: sorted(v) for k, v in grid.items() if k != LAMBDA}
        ordered[LAMBDA] = sorted(grid[LAMBDA])
        return ordered

    def points(self) -> list[dict[str, float]]:
        """Every grid point, components settings outermost (so points sharing components sit together)."""
        grid = self.full_grid()
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


class TuneSettings(BaseModel):
    """The `tune:` block: which methods, and the budget each gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: list[TuneMethod] = Field(default_factory=lambda: [TuneMethod(**m) for m in DEFAULT_METHODS], description="the methods compared")
    budget: int = Field(default=36, ge=1, description="evaluations per method on the search slice: its grid, then CMA-ES on per-model λ")
    limit: int | None = Field(default=None, gt=0, description="examples per task of the search slice (default: evaluation.limit)")
    top_k: int = Field(default=3, ge=1, description="candidates per method re-scored on more validation data before the choice")
    rescore_limit: int | None = Field(default=None, gt=0, description="examples per task of the re-scoring (default: the whole validation split)")
    popsize: int | None = Field(default=None, ge=2, description="CMA-ES candidates per round (default: 4 + ⌊3 ln n⌋)")
    bounds: tuple[float, float] = Field(default=(0.5, 1.5), description="CMA-ES bounds of every λ_i, as multiples of the grid's best λ")
    sigma0: float = Field(default=0.2, gt=0, description="CMA-ES initial step, as a multiple of the grid's best λ")
    seed: int = Field(default=0, ge=0, description="CMA-ES seed")
    weights: dict[str, float] | None = Field(default=None, description="task -> weight of the fitness mean")
    report_defaults: bool = Field(default=False, description="also score each method's default setting on the test split (reported, never used to choose)")
    workers: int = Field(default=2, ge=1, description="candidates evaluated at once (threads)")

    @field_validator("bounds")
    @classmethod
    def _around_the_grid_best(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < 1 < value[1]:
            raise ValueError("must be [lo, hi] with 0 ≤ lo < 1 < hi (multiples of the grid's best λ)")
        return value

    @field_validator("methods")
    @classmethod
    def _distinct(cls, value: list[TuneMethod]) -> list[TuneMethod]:
        if not value:
            raise ValueError("name at least one method")
        names = [m.name() for m in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"labels {twice} repeat; give each method entry its own label")
        return value

    @model_validator(mode="after")
    def _grids_fit_the_budget(self) -> TuneSettings:
        for method in self.methods:
            size = len(method.points())
            if size > self.budget:
                raise ValueError(f"the grid of {method.name()} has {size} points, more than the budget of {self.budget} evaluations per method")
        return self


class TunePipelineConfig(PipelineConfig):
    """Inputs, evaluation and registry target of a tuning run: `tune_flow`'s parameter model. Its
    `merge_method` and `parameters` are the first method's default setting (a valid pipeline config); each
    method's own come from `tune.methods`."""

    tune: TuneSettings = Field(default_factory=TuneSettings, description="methods, grids, budget and re-scoring of the tuner")


def _methods_data(value: Any, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise MergeInputError(f"{source}: key 'tune.methods' must be a list of method names or mappings")
    return [{"method": m} if isinstance(m, str) else m for m in value]


def parse_tune_config(data: Any, source: str = "config") -> TunePipelineConfig:
    """Validate a mapping into a `TunePipelineConfig`; errors name `source` and the key at fault."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: a tune config must be a YAML mapping with 'base_model', 'models', 'evaluation' and 'tune'")
    data = dict(data)
    for key in ("merge_method", "parameters"):
        if key in data:
            raise MergeInputError(f"{source}: key '{key}' has no meaning in a tune config; name the methods and their parameters under 'tune.methods'")
    tune_data = data.pop("tune", None) or {}
    if not isinstance(tune_data, dict):
        raise MergeInputError(f"{source}: key 'tune' must be a mapping of tuner settings")
    if "methods" in tune_data:
        tune_data = {**tune_data, "methods": _methods_data(tune_data["methods"], source)}
    try:
        tune = TuneSettings.model_validate(tune_data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(["tune", *(str(p) for p in err.get("loc", ()))])
        if err.get("type") == "extra_forbidden":
            model = TuneMethod if ".methods." in key else TuneSettings
            raise MergeInputError(f"{source}: unknown key '{key}'; allowed keys are {sorted(model.model_fields)}") from None
        given = err.get("input")
        shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
        where = "tune" if key == "tune" else f"key '{key}'"
        raise MergeInputError(f"{source}: {where}: {err.get('msg', 'is invalid').removeprefix('Value error, ')}{shown}") from None
    first = tune.methods[0]
    default = {k: v for k, v in first.default_setting().items() if k != LAMBDA}
    pipeline = parse_pipeline_config({**data, "merge_method": first.method, "parameters": {**first.parameters, **default}}, source=source)
    if pipeline.evaluation is None:
        raise MergeInputError(f"{source}: a tune config needs an 'evaluation' block: its tasks make the fitness")
    if tune.weights is not None:
        unknown = sorted(set(tune.weights) - set(pipeline.evaluation.tasks))
        if unknown:
            raise MergeInputError(f"{source}: key 'tune.weights' names {unknown}, which are not in evaluation.tasks {pipeline.evaluation.tasks}")
    config = TunePipelineConfig(**{name: getattr(pipeline, name) for name in PipelineConfig.model_fields}, tune=tune)
    from pipeline.tuning import method_config  # the per-method configs, checked now rather than mid-run

    for k, method in enumerate(tune.methods):
        where = f"{source}: tune.methods.{k} ({method.name()})"
        for setting in (method.points()[0], method.points()[-1]):  # the grid's corners: each key's smallest and largest value
            try:
                method_config(config, method, setting).merge_config(source=where)
            except ValidationError as exc:
                raise MergeInputError(f"{where}: {exc.errors()[0].get('msg', 'is invalid').removeprefix('Value error, ')}") from None
    return config


def load_tune_config(path: str | Path) -> TunePipelineConfig:
    """Read and validate a tune YAML; relative local model paths resolve as in a pipeline config."""
    return parse_tune_config(read_config_yaml(path), source=str(path))
