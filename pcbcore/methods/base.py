"""What every merge method is: parameter models, statistics stages and a components function.

Every method is written in the components form of SPEC eq. (1):

    θ_m = θ_pre + Σ_i λ_i · C_i

`components(task_vectors, stats, params, model_params, block)` returns C for one block of the scope
(task vectors flattened to (n, m)); the coefficients λ_i never enter it. `combine` applies a λ vector.
The CLI merge computes components and combines them block by block; the CMA-ES search stores the
components once and combines them for every candidate λ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from pcbcore.stages import Block, Stage, Stats

Scope = Literal["tensor", "model"]
# A kept fraction (density, PCB's ratio r): 0 < x ≤ 1.
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class MergekitMemoryOption(FrozenModel):
    """mergekit's `int8_mask` only saves memory in its sign masks; accepted so its files run unchanged."""

    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect on the result")


class ModelParams(FrozenModel):
    """Per-model keys shared by all methods. `lambda` is the model's coefficient λ_i in eq. (1)."""

    lambda_: float = Field(1.0, alias="lambda", description="coefficient λ_i of this model's component")


class WeightedModelParams(ModelParams):
    weight: float = Field(1.0, description="mergekit's per-model weight w_i")


class SparseModelParams(WeightedModelParams):
    density: Fraction = Field(1.0, description="fraction of the task vector's entries kept")


ComponentsFn = Callable[[torch.Tensor, Stats, FrozenModel, list, Block], torch.Tensor]


@dataclass
class TensorInputs:
    """One output tensor's inputs whole, as mergekit's method receives them (`MergeMethod.exact`)."""

    name: str
    base: torch.Tensor | None  # θ_pre in the working dtype, in the tensor's shape (None: the merge has no base)
    models: list[torch.Tensor]  # θ_i in the working dtype, in the job's order (the base itself where listed)
    is_base: list[bool]  # which θ_i is the base listed among the models (mergekit's methods leave it out of "non-base")
    dtype: torch.dtype  # the working dtype: the config's `dtype`, else the inputs' promoted dtype (mergekit's rule)


@dataclass
class Pending:
    """An `exact` result whose slow part runs in background threads (TIES's sort simulations): `finish()`
    waits for them and returns the merged tensor. The executor starts the next tensor before finishing
    this one, so the threads work while the tensors around it are read, mixed and written."""

    finish: Callable[[], torch.Tensor]
    threads: int  # the background threads its work keeps busy at most


# mergekit's own sequence of operations for one tensor, in its working dtype, so that a mergekit config gives
# mergekit's model to the bit (the components form rounds once, in float32, which differs by ulps). Returns
# the merged tensor (in the dtype mergekit returns it in), a `Pending` one, or None where the parameters are
# pcbmerge's own (the components form then merges this tensor).
ExactFn = Callable[[TensorInputs, FrozenModel, list], "torch.Tensor | Pending | None"]
StagesFn = Callable[[FrozenModel, list], list[Stage]]
# For methods whose components are fixed multiples of the task vectors, C_i = s_i·τ_i: the s_i.
ScalesFn = Callable[[FrozenModel, list], list[float]]


def no_stages(params: FrozenModel, model_params: list) -> list[Stage]:
    return []


@dataclass
class BaseWeights:
    """θ_pre of the block being merged, for a method with `needs_base` (put in its stats by the executor)."""

    values: torch.Tensor  # (m,) float32, read-only: the executor combines with it afterwards
    # Whether the base is already among the inputs — one of the merged models is the base itself (its task
    # vector then is 0) — or there is none (θ_pre = 0): a method that counts the base among its inputs
    # (Karcher mean) adds it only when this is false.
    listed: bool = False


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: type[FrozenModel]  # keys of the config's top-level `parameters`
    model_params: type[ModelParams]  # keys of each model's `parameters` (top-level values are their defaults)
    components: ComponentsFn
    stages: StagesFn = no_stages
    # linear averages the base too when the config lists it among the models (as mergekit does);
    # task-vector methods drop it, its task vector being zero.
    base_may_be_a_model: bool = False
    # When set, a merge folds s_i into λ_i and combines the task vectors directly (no components built).
    scales: ScalesFn | None = None
    # Components that need each tensor whole (a matrix's SVD, a norm over the tensor) get it as one block
    # however large it is: memory is then bounded by one tensor per model instead of one block.
    whole_tensor: bool = False
    # Methods that merge the weights themselves (a slerp's angle between θ_pre and θ_1, a softmax over a row
    # of weights), not only the task vectors, find the block's θ_pre in the stats as `BaseWeights`.
    needs_base: bool = False
    # A method that needs no base model (passthrough; mergekit's methods whose base is optional): with none
    # in the config, θ_pre = 0, so the components are the models' weights themselves.
    base_optional: bool = False
    # The most models one tensor may take from (passthrough: one), checked at config load.
    max_models: int | None = None
    # mergekit's op order (`ExactFn`), used by `pcbmerge merge` for a file mergekit could run: no
    # `compute_dtype`, no `lines`, every λ_i = 1. None: the components form is mergekit's result already.
    exact: ExactFn | None = None
    # The dtype mergekit returns this method's result in, given the working dtype, where it is not the
    # working dtype itself (written so when the file has no `out_dtype`).
    exact_dtype: Callable[[torch.dtype], torch.dtype] | None = None
    # Whether `exact` is elementwise (each entry from the same entry of the inputs: no norm, no order
    # statistic over the tensor), so it may run on blocks of rows, bounding memory as the components form does.
    exact_blocks: bool = False
    # Why these parameters have no components form (a mergekit option pcbmerge merges only in mergekit's order,
    # e.g. linear's `normalize: false`), or None: refused where the components form is needed (`compute_dtype`,
    # `lines`, per-model λ_i, a search).
    components_refusal: Callable[[FrozenModel], str | None] | None = None

    def scope(self, params: FrozenModel) -> Scope:
        return getattr(params, "scope", "tensor")


def lambdas_of(model_params: list[ModelParams]) -> torch.Tensor:
    return torch.tensor([m.lambda_ for m in model_params], dtype=torch.float32)


def combine(base: torch.Tensor, components: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """θ_pre + Σ_i λ_i C_i for one block. base: (m,), components: (n, m), lambdas: (n,) → (m,) float32."""
    lambdas = lambdas.to(device=components.device, dtype=components.dtype)
    return torch.addmv(base.to(components.dtype), components.T, lambdas)  # one gemv, ~2.5× faster than base + λ @ C


def scale_rows_(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """x[i] ← factors[i]·x[i] in place (rows whose factor is 1 are left alone)."""
    for row, factor in zip(x, factors):
        if factor != 1.0:
            row.mul_(factor)
    return x


def scaled_components(scales: ScalesFn) -> ComponentsFn:
    """The components function of a method whose C_i = s_i·τ_i (its `scales`)."""

    def components(task_vectors: torch.Tensor, stats: Stats, params: FrozenModel, model_params: list, block: Block) -> torch.Tensor:
        return scale_rows_(task_vectors.clone(), scales(params, model_params))

    return components


def shared_lambda(model_params: list) -> float | None:
    """mergekit's top-level `lambda` where every model's λ_i is the same value (pcbmerge reads it as each λ_i's
    default); None where they differ — a per-model λ_i, pcbmerge's own key, which mergekit's op order lacks."""
    values = {m.lambda_ for m in model_params}
    return values.pop() if len(values) == 1 else None


def unit_lambdas(model_params: list) -> bool:
    """Every λ_i is 1: a method without mergekit's `lambda` can follow mergekit's op order."""
    return shared_lambda(model_params) == 1.0


def weights_of(model_params: list) -> list[float]:
    return [m.weight for m in model_params]
