"""LiNeS: Layer-increasing Network Scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

Fine-tuning changes shallow layers least usefully and most harmfully (they hold the general features the
tasks share), so LiNeS scales the merged task vector linearly in depth: for layer ℓ of L (ℓ = 0 … L−1),

    λ(ℓ) = α + β · ℓ / (L − 1),

shallow layers scaled by α, the deepest by α + β. Tensors outside the numbered layers (embeddings, final
norm, head) take α, as in the authors' code. It composes with every method: the merge becomes
θ = θ_pre + λ(ℓ) · Σ_i λ_i C_i, i.e. each tensor's components are multiplied by its λ(ℓ), which the search
and tuner's stored components therefore carry too.

For multi-task merging the paper derives α from the number of tasks and the norms of the task vectors and
of the merged one, and tunes β on validation data; both are given explicitly here (`lines: {alpha, beta}` in the merge YAML).
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
