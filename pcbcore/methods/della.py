"""DELLA-Merging (Deep et al., 2024, arXiv 2406.11617): drop entries at random with a probability that falls
with their magnitude (MagPrune), rescale, then merge as TIES (`della`) or task arithmetic (`della_linear`).

MagPrune as mergekit computes it, per tensor and model: within each row (a 1-D tensor is one row) the
entries are ranked by |τ_i| (rank r = 0 … m − 1, ties by position); entry d is kept with probability

    p_d = (density − ε) + 2ε · r_d / (m − 1)

so the largest entries are kept most often and the mean kept fraction is `density`. With `rescale` (the
default) the survivors are scaled by ‖τ_i‖₁ / ‖kept τ_i‖₁ over the tensor — mergekit's L1 rescale, whose
factor is about 1/density (a little less, as the large entries survive more often) — where the paper
divides each survivor by its own p_d. At density 1 nothing is dropped and nothing rescaled. Then as
mergekit's generalized task arithmetic: w_i times each, `della` keeps the entries agreeing with the sign
of Σ_i w_i·kept τ_i (+ where that sum is 0); with `normalize` (default true for della, false for
della_linear) the sum is divided by the (agreeing) sum of weights.

Randomness: the draws are uniforms compared with p_d (a Bernoulli(p_d) draw), made per chunk of rows from
a generator seeded by (seed, model, tensor, chunk), exactly as DARE's masks (`pcbcore.methods.dare`): the
mask is a function of the seed and the tensor alone, on any device. mergekit draws from torch's global
generator (`--random-seed`), so the two tools keep different entries with the same probabilities.

Components (exact): C_i = w_i·kept τ_i·[agrees] / divisor, as in `pcbcore.methods.breadcrumbs`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.errors import MergeInputError
from pcbcore.methods.base import MergekitMemoryOption, MergeMethod, SparseModelParams, TensorInputs, weights_of
from pcbcore.methods.breadcrumbs import rescale_l1, weighted_mean_components
from pcbcore.methods.dare import uniform_draws, whole_tensor_draw
from pcbcore.methods.mergekit_ops import della_magprune, exact_task_arithmetic
from pcbcore.stages import Block, Stage, Stats


class DellaParams(MergekitMemoryOption):
    normalize: bool = Field(True, description="divide by the (agreeing) sum of weights")
    rescale: bool = Field(True, description="scale each pruned task vector back to its original L1 norm")
    seed: int = Field(0, description="seed of the drop masks")


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of weights")


class DellaModelParams(SparseModelParams):
    epsilon: float = Field(0.15, description="half-width ε of the keep probabilities around density (density ± ε must lie in (0, 1))")


def della_stages(params: DellaParams, model_params: list) -> list[Stage]:
    """No statistics; checks, before the tensor is merged, that every keep probability lies in (0, 1). (Here
    rather than in the params model: density and epsilon may each come from a different gradient or filter.)"""
    for m in model_params:
        if m.density < 1.0 and not (m.density - m.epsilon > 0.0 and m.density + m.epsilon < 1.0):
            raise MergeInputError(f"della: epsilon must leave density ± epsilon inside (0, 1) (got density {m.density}, epsilon {m.epsilon})")
    return []


def keep_probabilities(task_vector: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float) -> torch.Tensor:
    """p_d of MagPrune for one flat task vector of a tensor of `shape` (flat float32). Ranks run along dim 1
    (within each row of a matrix), along the whole vector of a 1-D tensor, as in mergekit."""
    magnitudes = task_vector.abs().reshape(shape if len(shape) > 1 else (1, task_vector.numel())).movedim(1, -1)
    m = magnitudes.shape[-1]
    order = torch.sort(magnitudes, dim=-1, stable=True).indices
    positions = torch.arange(m, dtype=magnitudes.dtype, device=magnitudes.device).expand_as(order).contiguous()
    ranks = torch.empty_like(magnitudes).scatter_(-1, order, positions)
    spread = (ranks / (m - 1)).clamp_(0.0, 1.0) if m > 1 else torch.full_like(ranks, 0.5)
    return spread.mul_(2.0 * epsilon).add_(density - epsilon).movedim(-1, 1).reshape(-1)


def magprune(task_vector: torch.Tensor, density: float, epsilon: float, rescale: bool, seed: int, model_index: int, block: Block) -> torch.Tensor:
    probabilities = keep_probabilities(task_vector, block.shape, density, epsilon)
    keep = uniform_draws(seed, model_index, block).to(task_vector.device) < probabilities
    kept = task_vector * keep
    return rescale_l1(task_vector, kept) if rescale else kept


def della_family(consensus: bool):
    def components(task_vectors: torch.Tensor, stats: Stats, params: DellaParams, model_params: list, block: Block) -> torch.Tensor:
        pruned = torch.empty_like(task_vectors)
        for i, m in enumerate(model_params):
            pruned[i] = task_vectors[i] if m.density >= 1.0 else magprune(task_vectors[i], m.density, m.epsilon, params.rescale, params.seed, i, block)
            pruned[i].mul_(m.weight)
        return weighted_mean_components(pruned, weights_of(model_params), consensus, params.normalize)

    return components


def della_family_exact(consensus: bool):
    def exact(inputs: TensorInputs, params: DellaParams, model_params: list) -> torch.Tensor | None:
        """mergekit's order: each δ_i through `mergekit_ops.della_magprune` (its ranks and probabilities in the
        work dtype, L1 rescale when `rescale`), then generalized task arithmetic (`della`: with the sign
        consensus of Σ_i w_i·δ_i). None (the components form) for per-model λ_i, or a tensor with one entry
        along dim 1 (mergekit's rank normalisation divides 0 by 0 there)."""
        if inputs.base is None:
            return None
        along = inputs.base.shape[1] if inputs.base.dim() > 1 else inputs.base.numel() if inputs.base.dim() == 1 else 0
        if along < 2 and any(m.density < 1.0 for m in model_params):
            return None

        def sparsify(delta: torch.Tensor, m: DellaModelParams, index: int) -> torch.Tensor:
            draw = whole_tensor_draw(params.seed, index, inputs.name, tuple(delta.shape))
            return della_magprune(delta, m.density, m.epsilon, params.rescale, draw)

        return exact_task_arithmetic(inputs, params, model_params, sparsify, consensus)

    return exact


def _method(name: str, params: type[DellaParams], consensus: bool) -> MergeMethod:
    components, exact = della_family(consensus), della_family_exact(consensus)
    return MergeMethod(name, params, DellaModelParams, components, della_stages, whole_tensor=True, exact=exact, exact_blocks=False)


DELLA = _method("della", DellaParams, consensus=True)
DELLA_LINEAR = _method("della_linear", DellaLinearParams, consensus=False)
