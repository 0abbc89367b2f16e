"""Named normalisation steps applied to phi(k) and phi(q), separate from any feature map.

"sum" divides a non-negative feature vector by the sum of its entries, so a key writes with
unit total mass (Schlag et al. 2021, Section 4.2). The paper's code divides keys by their sum
exactly and queries by (sum + 1e-6).
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.rules.native import steps, sum_normalise_backward, sum_normalise_forward

QUERY_EPS = 1e-6


def sum_normalise_reference(x: Tensor, eps: float = 0.0) -> Tensor:
    """x / (sum_i x_i + eps) over the last dimension, as plain PyTorch ops."""
    return x / (x.sum(dim=-1, keepdim=True) + eps)


class SumNormalise(torch.autograd.Function):
    """``sum_normalise_reference`` in one C pass each way (csrc/sum_normalise_impl.h), with
    dx = (g - g . y) / s from the output y and the sums s: PyTorch's graph for the reference is
    three passes forward and about six back, each over [B, L, d_dot] (DPFP's features take
    ``DPFPNormalised``, the two steps in one pass). The row sums are in a fixed four-lane order, not PyTorch's, so the floats
    differ from the reference's in the last place. The backward is differentiable (in PyTorch
    ops) when a graph of it is asked for."""

    @staticmethod
    def forward(ctx, x, eps, library):
        y, s = sum_normalise_forward(library, x.contiguous(), eps)
        ctx.save_for_backward(x, y, s)
        ctx.eps, ctx.library = eps, library
        return y

    @staticmethod
    def backward(ctx, g):
        x, y, s = ctx.saved_tensors
        if torch.is_grad_enabled():          # a graph of the backward: PyTorch ops from x
            s = x.sum(dim=-1, keepdim=True) + ctx.eps
            return (g - (g * (x / s)).sum(dim=-1, keepdim=True)) / s, None, None
        return sum_normalise_backward(ctx.library, y, s, g.contiguous()), None, None


def sum_normalise(x: Tensor, eps: float = 0.0) -> Tensor:
    """x / (sum_i x_i + eps) over the last dimension: ``SumNormalise`` where the compiled steps
    run, else ``sum_normalise_reference``."""
    library = steps(x) if x.dim() and x.numel() else None
    if library is None:
        return sum_normalise_reference(x, eps)
    return SumNormalise.apply(x, float(eps), library)


def normalise(x: Tensor, kind: str, eps: float = 0.0) -> Tensor:
    if kind == "none":
        return x
    if kind == "sum":
        return sum_normalise(x, eps)
    raise ValueError(f"unknown normalisation {kind!r}")
