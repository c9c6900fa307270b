"""Karcher mean: the weighted Riemannian (Fréchet) mean of the models' weights on the unit hypersphere
(Karcher, Comm. Pure Appl. Math. 1977; mergekit's `karcher`, arXiv 2603.04972).

Per tensor, every input counts equally (α = 1/N), the base included when the config names one, as in
mergekit, whose Karcher mean ignores which input is the base. Each weight tensor θ_k, flattened, is split
into its norm n_k and direction u_k; directions of norm at most `tol` are left out. Starting from the
normalised weighted mean of the directions, the mean μ is refined by gradient steps on the sphere, at
most `max_iter` times: the tangent T = Σ α_k (φ_k / sin φ_k)(u_k − cos φ_k μ), φ_k = arccos(u_k·μ) (terms
with φ_k < tol skipped), and μ ← cos‖T‖ μ + sin‖T‖ T/‖T‖, renormalised; the loop stops once ‖T‖ < tol.
The result is (Σ_k α_k n_k)·μ: the direction of the Karcher mean with the mean norm.

Components form: it does not hold in the sense of eq. (1) — the mean is an iterated, non-linear function
of the weights. The engine still takes θ_m = θ_pre + Σ_i λ_i C_i with C_i = (θ_m − θ_pre)/n, so λ_i = 1
(the default) is the method and λ_i scales model i's equal share of the change.

mergekit's op order (`karcher_exact`) keeps the weights in the working dtype throughout — the units, the
mean, the tangent and each step rounded there — and takes only the norms in float32 (float64 for float64
weights); the result is the float32 mean norm times the mean direction, in the working dtype.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import BaseWeights, FrozenModel, MergeMethod, ModelParams, TensorInputs, unit_lambdas
from pcbcore.stages import Block, Stats


class KarcherParams(FrozenModel):
    max_iter: int = Field(10, ge=0, description="most refinement steps of the mean")
    tol: float = Field(1e-5, ge=0.0, description="stop once the tangent step is shorter; norms and angles under it are ignored")


def karcher_mean(points: torch.Tensor, alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of the rows of `points` (k, m), with their mean norm (m,)."""
    if points.shape[0] == 1:
        return points[0].clone()
    norms = torch.linalg.vector_norm(points, dim=-1)  # (k,)
    valid = [k for k in range(points.shape[0]) if norms[k].item() > tol]
    if not valid:
        return torch.zeros_like(points[0])
    total = sum(alphas[k] for k in valid)
    weights = [alphas[k] / total for k in valid]
    units = [points[k] / norms[k] for k in valid]

    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units):
            dot = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm

    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def karcher_components(task_vectors: torch.Tensor, stats: Stats, params: KarcherParams, model_params: list, block: Block) -> torch.Tensor:
    base = stats.get(BaseWeights)
    points = base.values + task_vectors  # (n, m): the models' weights
    if not base.listed:  # mergekit adds a named base to the inputs when the models do not list it
        points = torch.cat([points, base.values.unsqueeze(0)])
    k = points.shape[0]
    merged = karcher_mean(points, [1.0 / k] * k, params.max_iter, params.tol)
    change = (merged - base.values).div_(task_vectors.shape[0])
    return change.expand_as(task_vectors).clone()


def karcher_mean_rounded(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """`karcher_mean` in mergekit's op order: the weights' dtype throughout, the norms in float32 (float64
    for float64 weights) as 0-d tensors, so every step rounds where mergekit's does."""
    if len(tensors) == 1:
        return tensors[0]
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(tensor.to(norm_dtype)) for tensor in tensors]
    units = [torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype) for tensor, norm in zip(tensors, norms)]
    valid = [k for k, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    total = sum(alphas[k] for k in valid)
    weights = [alphas[k] / total for k in valid]
    units = [units[k] for k in valid]

    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def karcher_exact(inputs: TensorInputs, params: KarcherParams, model_params: list) -> torch.Tensor | None:
    """mergekit's op order over every input, the listed models in order and then a named base they do not list."""
    if not unit_lambdas(model_params):
        return None
    tensors = list(inputs.models)
    if inputs.base is not None and not any(inputs.is_base):
        tensors.append(inputs.base)
    return karcher_mean_rounded(tensors, [1.0 / len(tensors)] * len(tensors), params.max_iter, params.tol)


METHOD = MergeMethod(
    "karcher",
    KarcherParams,
    ModelParams,
    karcher_components,
    base_may_be_a_model=True,
    whole_tensor=True,
    needs_base=True,
    base_optional=True,
    exact=karcher_exact,
)
