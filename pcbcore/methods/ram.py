"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572, as mergekit 0.1.5's `ram` and `ramplus_tl`).

Per entry, with τ_i = θ_i − θ_pre, m_i = [|τ_i| > ε] (the entries model i really changed) and c = Σ_i m_i
(how many models changed it):

    ram:         θ_m = θ_pre + Σ_i m_i·τ_i·([c = 1] + [c > 1]/c)

an entry one model alone changed keeps that change whole; one several changed takes their mean. `ramplus_tl`
(tensor-local RAM+) also scales each model's unique changes by λ_i = 1 + r·clamp(ρ_i, 0, α), with
ρ_i = (#entries of the tensor it shares with another model) / max(#entries it changed alone, ε) — models
whose changes mostly overlap with others' get their unique ones amplified.

Components form (exact): C_i = m_i·τ_i·([c = 1]·λ_i + [c > 1]/c), with λ_i = 1 for `ram`; elementwise for
`ram` (streamed in blocks), a count over the whole tensor for `ramplus_tl` (each tensor whole).

mergekit's op order (`ram_exact`), in the working dtype: the masks and counts as above (counts as integers),
τ·m·[c = 1] + τ·m·[c > 1] / max(c, 1) summed over the models, plus θ_pre. RAM+ takes its λ_i as float32
tensors, which promotes a bf16 or fp16 merge to float32 as mergekit returns it (`exact_dtype`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import FrozenModel, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.stages import Block, Stats


class RamParams(FrozenModel):
    epsilon: float = Field(1e-5, ge=0.0, description="|τ| above which an entry counts as changed by a model")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="RAM+ gain: a model's unique changes are scaled by 1 + r·clamp(ρ, 0, α)")
    alpha: float = Field(0.2, description="RAM+ cap α on the overlap ratio ρ")


def _masks(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m (n, m) bool and c (1, m) int64: which models changed each entry, and how many."""
    changed = task_vectors.abs() > epsilon
    return changed, changed.sum(dim=0, keepdim=True)


def ram_gains(changed: torch.Tensor, counts: torch.Tensor, params: RamPlusParams) -> torch.Tensor:
    """RAM+'s λ_i (n,) float32 from one tensor's masks."""
    shared = (changed & (counts > 1)).sum(dim=1)
    unique = (changed & (counts == 1)).sum(dim=1)
    rho = shared / unique.clamp(min=params.epsilon)
    return 1 + params.r * rho.clamp(min=0, max=params.alpha)


def _components(task_vectors: torch.Tensor, params: RamParams, plus: bool) -> torch.Tensor:
    changed, counts = _masks(task_vectors, params.epsilon)
    unique = (counts == 1).to(task_vectors.dtype)
    if plus:
        unique = unique * ram_gains(changed, counts, params).to(task_vectors.dtype).unsqueeze(-1)  # (n, m)
    shared = (counts > 1).to(task_vectors.dtype) / counts.clamp(min=1).to(task_vectors.dtype)
    return task_vectors * changed * (unique + shared)


def ram_components(task_vectors: torch.Tensor, stats: Stats, params: RamParams, model_params: list, block: Block) -> torch.Tensor:
    return _components(task_vectors, params, plus=False)


def ramplus_components(task_vectors: torch.Tensor, stats: Stats, params: RamPlusParams, model_params: list, block: Block) -> torch.Tensor:
    return _components(task_vectors, params, plus=True)


def _exact(inputs: TensorInputs, params: RamParams, model_params: list, plus: bool) -> torch.Tensor | None:
    """mergekit's op order (module docstring)."""
    if not unit_lambdas(model_params):
        return None
    base = inputs.base
    if not inputs.models:
        return base
    task_vectors = torch.stack([theta - base for theta in inputs.models], dim=0).view(len(inputs.models), -1)
    changed, counts = _masks(task_vectors, params.epsilon)
    overlap, unique = counts > 1, counts == 1
    kept = task_vectors * changed
    if plus:
        gains = ram_gains(changed, counts, params)
        merged = (kept * unique * gains.unsqueeze(-1) + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    else:
        merged = (kept * unique + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram_exact(inputs: TensorInputs, params: RamParams, model_params: list) -> torch.Tensor | None:
    return _exact(inputs, params, model_params, plus=False)


def ramplus_exact(inputs: TensorInputs, params: RamPlusParams, model_params: list) -> torch.Tensor | None:
    return _exact(inputs, params, model_params, plus=True)


def gains_dtype(working: torch.dtype) -> torch.dtype:
    """RAM+'s float32 λ_i promote the merge: float32 for bf16/fp16 work, float64 stays float64."""
    return torch.promote_types(working, torch.float32)


RAM = MergeMethod("ram", RamParams, ModelParams, ram_components, exact=ram_exact, exact_blocks=True)
RAMPLUS_TL = MergeMethod("ramplus_tl", RamPlusParams, ModelParams, ramplus_components, whole_tensor=True, exact=ramplus_exact, exact_dtype=gains_dtype)
