"""Iso-C and Iso-CTS: Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025 (PMLR 267; arXiv 2502.04959).

Both are the paper's Section 4, "Isotropic Merging in Common and Task-specific Subspaces" (Iso-C its merge in
the common subspace, Iso-CTS its extension with task-specific subspaces). Equation numbers for Iso-C and
Iso-CTS not confirmed: the method section was not reachable. (The authors' repository, `fig_3a.py`, names
the paper's Eq. 5, the subspace alignment ratio, and Eq. 6, the rank k_M from the approximation error:
analysis quantities, which this file does not compute.) The steps below were checked line by line against
the authors' `iso_c` / `iso_cts` as released in FusionBench (`isotropic_merging`): same sum, same mean of σ
over all r kept values, same rank split with Python's round, same order of the blocks before orthogonalising.

Task arithmetic's sum of task matrices has a spectrum dominated by a few directions, which the tasks with
the largest updates own; the others are left behind. Both methods flatten the spectrum. Per matrix
(2-D tensor), with n tasks and r = min(rows, cols):

Iso-C (isotropic merging in the common subspace):
    Δ = Σ_i τ_i = U Σ Vᵀ,   σ̄ = mean of the r singular values,   M = α · σ̄ · U Vᵀ.

Iso-CTS (common and task-specific subspaces): the smallest directions of Δ's subspace are replaced by
directions specific to each task and orthogonal to the common ones.
  - The rank budget r splits into a common part k and n task parts of s each, k + n·s = r: k₀ = ⌊r·f⌋
    (f = `common_space_fraction`, 0.8 in the paper), n·s = round((r − k₀)/n)·n so the task-specific total
    divides evenly among the tasks, k = r − n·s (the authors' code, Python's round included).
  - Common subspace: the k leading left singular vectors U_k of Δ, with their σ and V.
  - Task-specific: τ_i projected off the common subspace, τ̃_i = τ_i − U_k U_kᵀ τ_i; its s leading triplets.
  - U = [Ũ_1 … Ũ_n, U_k], V likewise, then both orthogonalised (the polar factor, as in TSV-M:
    `pcbcore.methods.tsv.orthogonalise`), and M = α · σ̄ · U⊥ V⊥ᵀ with σ̄ the mean of all r kept σ.

Tensors that are not matrices are merged by the mean of the task vectors, α·Σ_i τ_i/n (both methods, as in
the authors' code). α defaults to 1.0, FusionBench's `scaling_factor` for both; the paper selects it on
validation data. One guard the authors' code lacks: when rounding would give the task parts more than r
directions (a small common fraction), one direction per task is moved back to the common part
(`split_rank`); at the default f = 0.8 the split is the authors'.

Components: Iso-C is not linear in the task vectors (σ̄ and U Vᵀ depend on their sum), so eq. (1) of SPEC
holds only trivially: C_i = M/n, and λ_i scales an equal share of one merged update (Σ_i λ_i/n · M), not
task i's contribution. Iso-CTS splits M into per-task blocks plus the common block, shared evenly:
C_i = α·σ̄·(U⊥_i V⊥_iᵀ + U⊥_k V⊥_kᵀ / n). SVDs run on the tensors' device in float32, each matrix whole.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import FrozenModel, MergeMethod, ModelParams
from pcbcore.methods.tsv import as_matrices, block_components, is_matrix, mean_components, orthogonalise, svd, top_triplets
from pcbcore.stages import Block, Stats


class IsoCParams(FrozenModel):
    alpha: float = Field(1.0, description="overall scale α of the merged task vector (1.0 in the authors' configs)")


class IsoCtsParams(IsoCParams):
    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0, description="fraction f of the rank kept for the common subspace (0.8 in the paper)")


def iso_c_components(task_vectors: torch.Tensor, stats: Stats, params: IsoCParams, model_params: list, block: Block) -> torch.Tensor:
    n = len(task_vectors)
    if not is_matrix(block):
        return mean_components(task_vectors, params.alpha)
    u, s, vh = svd(as_matrices(task_vectors, block).sum(0))
    merged = (u * (s.mean() * params.alpha / n)) @ vh  # M/n
    return merged.reshape(1, -1).expand(n, -1).clone()


def split_rank(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(k, s): the common subspace's rank and each task's, with k + n·s = r (the authors' rounding)."""
    common = int(r * fraction)
    specific = round((r - common) / n) * n
    if specific > r:  # rounding up overshoots when the common part is small
        specific -= n
    return r - specific, specific // n


def iso_cts_components(task_vectors: torch.Tensor, stats: Stats, params: IsoCtsParams, model_params: list, block: Block) -> torch.Tensor:
    n = len(task_vectors)
    if not is_matrix(block):
        return mean_components(task_vectors, params.alpha)
    matrices = as_matrices(task_vectors, block)
    k, per_task = split_rank(min(block.shape), n, params.common_space_fraction)
    u_common, s_common, vh_common = top_triplets(matrices.sum(0), k)
    us, ss, vhs = [], [], []
    for matrix in matrices:
        specific = matrix - u_common @ (u_common.T @ matrix)  # off the common subspace
        u, s, vh = top_triplets(specific, per_task)
        us.append(u), ss.append(s), vhs.append(vh)
    u = orthogonalise(torch.cat([*us, u_common], dim=1))  # (rows, r)
    vh = orthogonalise(torch.cat([*vhs, vh_common], dim=0))  # (r, cols)
    s = torch.cat([*ss, s_common])
    flat = torch.full_like(s, float(s.mean()) * params.alpha)
    spans = [(i * per_task, (i + 1) * per_task) for i in range(n)]
    return block_components(u, flat, vh, spans, shared=(n * per_task, n * per_task + k))


ISO_C = MergeMethod("iso_c", IsoCParams, ModelParams, iso_c_components, whole_tensor=True)
ISO_CTS = MergeMethod("iso_cts", IsoCtsParams, ModelParams, iso_cts_components, whole_tensor=True)
