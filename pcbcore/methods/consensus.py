"""Consensus merging with TALL masks, data-free (Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard,
"Localizing Task Information for Improved Model Merging and Compression", ICML 2024, arXiv 2405.07813).

The mask rule and the consensus count are the paper's TALL masks and Consensus Merging. Equation numbers not
confirmed: the method section was not reachable. Both were checked against the authors' released code
(`generate_task_masks`, `construct_consensus_mask`, and `create_task_vector`'s "consensus" branch).

Given a multi-task vector τ_MTL from task arithmetic (Σ_i w_i τ_i) or TIES, each task's TALL mask marks the
entries where the task's own update outweighs what the merge moves it away by:

    m_i = 1{ |τ_i| > λ_m · |τ_MTL − τ_i| }                       (TALL mask, strict as in the authors' code)

(secondary sources quote the paper's rule with ≥; the two differ only where |τ_i| = λ_m·|τ_MTL − τ_i|
exactly, e.g. at τ_i = τ_MTL = 0, where the merged entry is 0 either way)

and the consensus mask keeps the entries that at least k tasks mark (k = 2 drops both "catastrophic" weights,
used by no task, and "selfish" ones, used by a single task):

    m = 1{ Σ_i m_i ≥ k },   θ = θ_pre + α · m ⊙ τ_MTL.

The paper picks λ_m per task on validation data from {0.2, …, 0.6}; this data-free form takes one λ_m for all
tasks (`mask_lambda`, default 0.4, the middle of that grid). α multiplies the masked multi-task vector;
the paper tunes it like task arithmetic's coefficient, the default here is 1.0 (task arithmetic's and
TIES's own default in this engine). k = 0 gives back the underlying method; k > n gives the base.

Components (eq. (1) of SPEC holds exactly): the masks are computed from the λ-free components C_i of the
underlying method (τ_MTL = Σ_i C_i), then C_i ← α · m ⊙ C_i. Everything is per entry, so tensors stream in
row blocks; `consensus_ties` runs TIES's stages (trim cut, majority sign) over its scope first.

Where the authors' code differs: (1) its τ_MTL is the unweighted Σ_i τ_i (task arithmetic) or TIES with a
disjoint *sum* trimmed to the top 20 % over the whole model, for the masks and the merged vector alike; here
it is the underlying method as configured, per-model `weight`s included, and TIES's disjoint mean by default
(`normalize: false` and `scope: model` give the authors' form). With unit weights `consensus_ta` matches
theirs. (2) The authors choose λ_m per task on validation data, and α on validation data afterwards.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.kernels import sum_rows
from pcbcore.methods.base import FrozenModel, MergeMethod, SparseModelParams, WeightedModelParams
from pcbcore.methods.task_arithmetic import task_arithmetic_scales
from pcbcore.methods.ties import TiesParams, ties_components, ties_stages
from pcbcore.stages import Block, Stats


class ConsensusOptions(FrozenModel):
    alpha: float = Field(1.0, description="scale α of the masked multi-task vector")
    k: int = Field(2, ge=0, description="least number of tasks whose TALL masks keep an entry (2 in the paper)")
    mask_lambda: float = Field(0.4, ge=0.0, description="λ_m of the TALL masks |τ_i| > λ_m·|τ_MTL − τ_i| (the paper tunes it in 0.2–0.6)")


class ConsensusTaParams(ConsensusOptions):
    normalize: bool = Field(False, description="divide the task arithmetic sum by the sum of weights")


class ConsensusTiesParams(TiesParams, ConsensusOptions):
    pass


def consensus_mask(task_vectors: torch.Tensor, multi_task: torch.Tensor, k: int, mask_lambda: float) -> torch.Tensor:
    """1.0 where at least k TALL masks |τ_i| > λ_m·|τ_MTL − τ_i| agree, else 0.0 (m,)."""
    votes = torch.zeros_like(multi_task)
    for task_vector in task_vectors:
        votes.add_((task_vector.abs() > (multi_task - task_vector).abs_().mul_(mask_lambda)).to(votes.dtype))
    return votes.ge_(k).to(multi_task.dtype)


def apply_consensus(components: torch.Tensor, task_vectors: torch.Tensor, params: ConsensusOptions) -> torch.Tensor:
    """C_i ← α·m⊙C_i, m the consensus mask of τ_MTL = Σ_i C_i (in place on `components`)."""
    mask = consensus_mask(task_vectors, sum_rows(components), params.k, params.mask_lambda)
    return components.mul_(mask.mul_(params.alpha))


def consensus_ta_components(task_vectors: torch.Tensor, stats: Stats, params: ConsensusTaParams, model_params: list, block: Block) -> torch.Tensor:
    scales = torch.tensor(task_arithmetic_scales(params, model_params), dtype=task_vectors.dtype, device=task_vectors.device)
    return apply_consensus(task_vectors * scales[:, None], task_vectors, params)


def consensus_ties_components(task_vectors: torch.Tensor, stats: Stats, params: ConsensusTiesParams, model_params: list, block: Block) -> torch.Tensor:
    return apply_consensus(ties_components(task_vectors, stats, params, model_params, block), task_vectors, params)


CONSENSUS_TA = MergeMethod("consensus_ta", ConsensusTaParams, WeightedModelParams, consensus_ta_components)
CONSENSUS_TIES = MergeMethod("consensus_ties", ConsensusTiesParams, SparseModelParams, consensus_ties_components, ties_stages)
