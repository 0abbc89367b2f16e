"""Named normalisation steps applied to phi(k) and phi(q), separate from any feature map.

"sum" divides a non-negative feature vector by the sum of its entries, so a key writes with
unit total mass (Schlag et al. 2021, Section 4.2). The paper's code divides keys by their sum
exactly and queries by (sum + 1e-6).
"""
from __future__ import annotations

from torch import Tensor

QUERY_EPS = 1e-6


def sum_normalise(x: Tensor, eps: float = 0.0) -> Tensor:
    """x / (sum_i x_i + eps) over the last dimension."""
    return x / (x.sum(dim=-1, keepdim=True) + eps)


def normalise(x: Tensor, kind: str, eps: float = 0.0) -> Tensor:
    if kind == "none":
        return x
    if kind == "sum":
        return sum_normalise(x, eps)
    raise ValueError(f"unknown normalisation {kind!r}")
