"""NearSwap (alchemonaut, "QuartetAnemoi-70B-t0.0001" model card, as mergekit's `nearswap`): take the other
model's value where it is near the base's, and stay near the base where the two are far apart.

Per entry, with τ = θ_1 − θ_pre: w = clamp(t / max(|τ|, 1e-6), 0, 1) and θ_m = w·θ_1 + (1 − w)·θ_pre. An
entry within t of the base is swapped whole (w = 1); one further away moves by exactly t towards θ_1.

Components form (exact): C_1 = w ⊙ τ_1, elementwise, so the method streams in blocks of rows.

mergekit's op order (`nearswap_exact`), in the working dtype: w from |θ_pre − θ_1| (t over it as t times
its reciprocal), then w·θ_1 + (1 − w)·θ_pre — elementwise too, so it streams in blocks as well.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import FrozenModel, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.methods.slerp import exactly_one_model
from pcbcore.stages import Block, Stats


class NearswapParams(FrozenModel):
    t: float = Field(description="distance under which the other model's value is taken whole (required, as in mergekit)")


nearswap_stages = exactly_one_model("nearswap")


def nearswap_components(task_vectors: torch.Tensor, stats: Stats, params: NearswapParams, model_params: list, block: Block) -> torch.Tensor:
    weight = torch.div(params.t, task_vectors.abs().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return weight.mul_(task_vectors)


def nearswap_exact(inputs: TensorInputs, params: NearswapParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order (module docstring), entry by entry in the working dtype."""
    if not unit_lambdas(model_params):
        return None
    base = inputs.base
    (other,) = inputs.models  # the base is never among them
    distance = torch.abs(base - other)
    weight = (params.t / distance.clamp(min=1e-6)).clamp(min=0, max=1)  # a number over a tensor: t·(1/|d|), as Python's `/` gives
    return weight * other + (1 - weight) * base


METHOD = MergeMethod("nearswap", NearswapParams, ModelParams, nearswap_components, nearswap_stages, exact=nearswap_exact, exact_blocks=True)
