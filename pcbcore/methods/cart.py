"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi, Kim, Lee, Hong, "Revisiting Weight Averaging
for Model Merging", arXiv 2412.12153, 2024).

The merge below is the paper's CART (its centred task vectors and their low-rank approximation). Equation
numbers not confirmed: the method section was not reachable. It was checked against the authors'
released code (`StaticMergeModule._merge_weights`, method "CART"): θ_avg plus `prior` times the sum of the
rank-⌊ρ·min(rows, cols)⌋ (at least 1) truncations of θ_i − θ_avg, which is what is computed here.

Weight averaging is task arithmetic around a moved origin: with θ_avg = θ_pre + τ̄ (τ̄ = Σ_i τ_i/n), the
*centered* task vectors τ_i − τ̄ carry what distinguishes the tasks, and their leading singular directions
carry most of it while the tail is interference. CART keeps the k leading triplets of each and adds them
back to the average:

    θ = θ_avg + α · Σ_i SVD_k(τ_i − τ̄),   k = max(1, ⌊ρ·min(rows, cols)⌋),

per matrix (2-D tensor). Defaults as in the authors' 8-task ViT-B/32 configuration: rank ratio ρ = 0.12 and
α (their "prior") = 2.0. Tensors that are not matrices take their full centered vectors, which sum to zero,
so they end at the average, as in the authors' code. One difference in scope: the authors' code truncates
only the attention and MLP matrices of a CLIP encoder (keys naming `attn` or `mlp`, not norms or biases) and
leaves every other 2-D tensor (embeddings, projections) at the average, whereas here every matrix is
truncated, embeddings and the LM head included (at ρ = 1 a matrix ends at θ_avg, as the authors' other
tensors do, since full centred vectors sum to zero).

Components (eq. (1) of SPEC holds exactly): C_i = τ_i/n + α·SVD_k(τ_i − τ̄) (for non-matrices,
τ_i/n + α·(τ_i − τ̄)). At λ = 1 their sum is θ_avg − θ_pre + α Σ_i SVD_k(τ_i − τ̄); λ_i moves the merge
towards (λ_i > 1) or away from task i. The SVDs run on the tensors' device in float32, each matrix whole.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pcbcore.methods.base import Fraction, FrozenModel, MergeMethod, ModelParams
from pcbcore.methods.tsv import is_matrix, svd
from pcbcore.stages import Block, Stats


class CartParams(FrozenModel):
    alpha: float = Field(2.0, description="scale α of the summed low-rank centered task vectors (the authors' 'prior', 2.0)")
    rank_ratio: Fraction = Field(0.12, description="fraction ρ of each matrix's rank kept per centered task vector (0.12 in the authors' config)")


def cart_components(task_vectors: torch.Tensor, stats: Stats, params: CartParams, model_params: list, block: Block) -> torch.Tensor:
    n = len(task_vectors)
    centered = task_vectors - task_vectors.mean(0)  # (n, m): τ_i − τ̄
    if is_matrix(block):
        k = max(1, int(params.rank_ratio * min(block.shape)))
        for matrix in centered.view(n, *block.shape):  # one task's factors at a time
            u, s, vh = svd(matrix)
            torch.matmul(u[:, :k] * s[:k], vh[:k], out=matrix)
    return centered.mul_(params.alpha).add_(task_vectors, alpha=1.0 / n)


METHOD = MergeMethod("cart", CartParams, ModelParams, cart_components, whole_tensor=True)
