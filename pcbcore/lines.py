"""LiNeS: Layer-increasing Network Scaling (Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret, Frossard,
"LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025,
arXiv 2410.17146).

The scaling rule is the paper's LiNeS, applied as in its multi-task merging experiments. Equation numbers not
confirmed: the method section was not reachable. It was checked against the authors' released code
(`LiNeS_scaling`): the same λ(ℓ), layers counted from 0, and α for every tensor outside the numbered blocks.

Fine-tuning changes shallow layers least usefully and most harmfully (they hold the general features the
tasks share), so LiNeS scales the merged task vector linearly in depth: for layer ℓ of L (ℓ = 0 … L−1),

    λ(ℓ) = α + β · ℓ / (L − 1),

shallow layers scaled by α, the deepest by α + β. Tensors outside the numbered layers (embeddings, final
norm, head) take α, as in the authors' code. It composes with every method: the merge becomes
θ = θ_pre + λ(ℓ) · Σ_i λ_i C_i, i.e. each tensor's components are multiplied by its λ(ℓ), which the search
and tuner's stored components therefore carry too.

For multi-task merging the authors' code sets α = ‖Σ_i τ_i‖₁ / (n · ‖τ_MTL‖₁) (the ℓ₁ norms of the summed
task vectors and of the merged one, n tasks) and tunes β on validation data; both are given explicitly here
(`lines: {alpha, beta}` in the merge YAML). Their L is the encoder's block count (12 or 24); here it is read
from the tensor names, the same number for a model whose every layer is present.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from pcbcore.methods.base import FrozenModel


class LinesParams(FrozenModel):
    alpha: float = Field(description="scale of the shallowest layer's merged task vector (and of tensors outside the layers)")
    beta: float = Field(description="added to alpha at the deepest layer, linearly in depth in between")


def layer_scales(lines: LinesParams, names: Iterable[str]) -> dict[str, float]:
    """λ(ℓ) per tensor name; L is the number of layers the names span (largest layer index + 1)."""
    # Imported here: pcbcore.components imports the executor, which imports this module.
    from pcbcore.components import layer_index

    layers = {name: layer_index(name) for name in names}
    n_layers = max((layer for layer in layers.values() if layer is not None), default=0) + 1
    depth = max(n_layers - 1, 1)
    return {name: lines.alpha if layer is None else lines.alpha + lines.beta * layer / depth for name, layer in layers.items()}
