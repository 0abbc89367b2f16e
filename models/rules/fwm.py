"""The Fast Weight Memory update of Schlag, Munkhdalai & Schmidhuber (2021, "Learning
Associative Inference Using Fast Weight Memory", arXiv 2011.07831), as used as the
"Schlag (2021)" baseline of arXiv 2102.11174:

    W_1 = beta_1 v_1 k_1^T
    W_t = clip(W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T),  clip(W) = W / max(1, ||W||_F)
    y   = LayerNorm(W_L q)     (no affine parameters, over the D_v outputs)

Keys are not normalised. As in the original code the first write is not clipped.

Fast form (exact): write W_t = gamma_t M_t with a scalar gamma_t (the running product of the
clip factors). Then M follows a plain delta rule with targets v_t / gamma_{t-1}, and the
clip factor needs only ||M_t||^2 = ||M_{t-1}||^2 + 2 u.(M_{t-1} k) + |u|^2 |k|^2, built
from quantities the step computes anyway: no full-state norm and no full-state division per
step. gamma is folded back into M whenever it falls below 1e-3 (keeps 1/gamma small in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.rules.base import UpdateRule

REFOLD_BELOW = 1e-3


def _clip_factor(norm: Tensor) -> Tensor:
    return 1.0 / torch.clamp(norm, min=1.0)


def fwm_recurrent(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor):
    """Reference loop (state S = W^T). q, k [B, L, D_k], v [B, L, D_v], beta [B, L]
    -> (o [B, L, D_v] = S_t^T q_t before LayerNorm, or None; S_L [B, D_k, D_v])."""
    B, L, D_k = k.shape
    S = k.new_zeros(B, D_k, v.shape[2])
    outputs = []
    q_steps = q.unbind(1) if q is not None else [None] * L
    for t, (q_t, k_t, v_t, b_t) in enumerate(zip(q_steps, k.unbind(1), v.unbind(1), beta.unbind(1))):
        retrieved = torch.einsum("bkv,bk->bv", S, k_t)
        S = S + k_t[:, :, None] * (b_t[:, None] * (v_t - retrieved))[:, None, :]
        if t > 0:
            S = S * _clip_factor(S.flatten(1).norm(dim=1))[:, None, None]
        if q_t is not None:
            outputs.append(torch.einsum("bkv,bk->bv", S, q_t))
    return (torch.stack(outputs, dim=1) if q is not None else None), S


def fwm_scaled(k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """Fast exact form of ``fwm_recurrent``'s final state S_L [B, D_k, D_v] (see module doc)."""
    B, L, D_k = k.shape
    M = k.new_zeros(B, D_k, v.shape[2])
    gamma = k.new_ones(B)                    # W_t = gamma_t M_t
    norm_sq = k.new_zeros(B)                 # ||M_t||_F^2
    for t, (k_t, v_t, b_t) in enumerate(zip(k.unbind(1), v.unbind(1), beta.unbind(1))):
        retrieved = torch.einsum("bkv,bk->bv", M, k_t)                    # M_{t-1}^T k_t
        u = b_t[:, None] * (v_t / gamma[:, None] - retrieved)             # [B, D_v]
        norm_sq = (norm_sq + 2 * (u * retrieved).sum(-1)
                   + u.pow(2).sum(-1) * k_t.pow(2).sum(-1)).clamp(min=0)
        M = M + k_t[:, :, None] * u[:, None, :]
        if t > 0:
            # +1e-30: sqrt has an infinite slope at 0, and 0 * inf would poison the gradient.
            gamma = gamma * _clip_factor(gamma * (norm_sq + 1e-30).sqrt())
        if bool((gamma < REFOLD_BELOW).any()):
            M = M * gamma[:, None, None]
            norm_sq = norm_sq * gamma.pow(2)
            gamma = torch.ones_like(gamma)
    return M * gamma[:, None, None]


class FWMRule(UpdateRule):
    """Schlag et al. (2021) fast weight memory: delta update, Frobenius clip, LayerNorm read."""

    name = "fwm"
    uses_beta = True

    def write(self, k, v, beta):
        return fwm_scaled(k, v, beta)

    def read(self, state, q):
        return F.layer_norm(q @ state, (state.shape[-1],))
