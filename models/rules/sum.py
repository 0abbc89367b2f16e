"""The sum rule: linear attention as a fast weight programmer (Katharopoulos et al. 2020,
arXiv 2006.16236; Schlag et al. 2021, arXiv 2102.11174, eqs. 5-8).

    S_t = S_{t-1} + phi(k_t) v_t^T,        z_t = z_{t-1} + phi(k_t)
    o_t = S_t^T phi(q_t) / (z_t . phi(q_t) + eps)      (attention normaliser, optional)

Recurrent form (a loop over t) and parallel form (causally masked attention) are equal; the
memory of a whole sequence is S_L = K^T V. With one-hot values v_t = e_{id_t} (the retrieval
task), K^T V is a scatter-add of the keys into the value columns, S_L[:, s] = sum_{t: id_t = s} k_t:
O(L D_k) instead of the O(L D_k D_v) product (``sum_rule_write_one_hot``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.rules.base import UpdateRule

EPS = 1e-6


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, normalise: bool = True,
                               eps: float = EPS):
    """Reference loop. q, k [B, L, D_k], v [B, L, D_v] -> (o [B, L, D_v], (S [B, D_k, D_v], z [B, D_k]))."""
    S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2])
    z = k.new_zeros(k.shape[0], k.shape[2])
    outputs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):
        S = S + k_t[:, :, None] * v_t[:, None, :]
        z = z + k_t
        o_t = torch.einsum("bk,bkv->bv", q_t, S)
        if normalise:
            o_t = o_t / ((z * q_t).sum(-1, keepdim=True) + eps)
        outputs.append(o_t)
    return torch.stack(outputs, dim=1), (S, z)


def linear_attention_parallel(q: Tensor, k: Tensor, v: Tensor, normalise: bool = True,
                              eps: float = EPS):
    """Parallel form: o = tril(Q K^T) V (/ row sums). Same shapes as the recurrent form."""
    scores = torch.einsum("bik,bjk->bij", q, k).tril()               # [B, L, L], causal incl. t
    o = scores @ v
    if normalise:
        o = o / (scores.sum(-1, keepdim=True) + eps)
    return o, (k.transpose(1, 2) @ v, k.sum(dim=1))


def sum_rule_write_one_hot(k: Tensor, ids: Tensor, d_value: int):
    """(K^T one_hot(ids, D_v), sum_t k_t) without forming the one-hot matrix.

    k [B, L, D_k], ids [B, L] long -> (S [B, D_k, D_v], z [B, D_k]). S is returned as a
    transposed view of the [B, D_v, D_k] target (row s = sum of the keys stored with value s);
    matmul reads it without a copy. index_add over flattened rows (backward: index_select)
    copies whole key rows; scatter_add with an index expanded over D_k was several times
    slower at d_dot = 384.
    """
    B, L, D_k = k.shape
    rows = (ids + d_value * torch.arange(B, device=ids.device)[:, None]).flatten()   # [B * L]
    S_rows = k.new_zeros(B * d_value, D_k).index_add(0, rows, k.reshape(B * L, D_k))
    return S_rows.view(B, d_value, D_k).transpose(1, 2), k.sum(dim=1)


class SumRule(UpdateRule):
    """W = sum_t v_t phi(k_t)^T; read with the attention normaliser by default."""

    name = "sum"

    def __init__(self, d_key: int, d_value: int, normaliser: bool = True):
        super().__init__(d_key, d_value)
        self.normaliser = bool(normaliser)

    def write(self, k, v, beta=None):
        return k.transpose(1, 2) @ v, k.sum(dim=1)                     # [B, D_k, D_v], [B, D_k]

    def write_one_hot(self, k, ids, beta=None):
        """``write`` for values v = one_hot(ids, d_value), as a scatter-add."""
        return sum_rule_write_one_hot(k, ids, self.d_value)

    def attend_one_hot(self, scores: Tensor, ids: Tensor) -> Tensor:
        """``read(write_one_hot(k, ids), q)`` from the kernel scores alone (attention form):
        scores [B, Q, L] = phi(q_i) . phi(k_t), ids [B, L] -> [B, Q, D_v]; output s holds the
        scores of the positions storing value s (/ the sum of all scores)."""
        B, Q, L = scores.shape
        index = ids[:, None, :].expand(B, Q, L)
        o = scores.new_zeros(B, Q, self.d_value).scatter_add(2, index, scores)
        if self.normaliser:
            o = o / (scores.sum(-1, keepdim=True) + EPS)
        return o

    def causal(self, q, k, v, beta=None):
        return linear_attention_parallel(q, k, v, self.normaliser)[0]

    def read(self, state, q):
        S, z = state
        o = q @ S                                                     # [B, Q, D_v]
        if self.normaliser:
            o = o / ((q @ z[:, :, None]) + EPS)
        return o

    def extra_repr(self) -> str:
        return f"normaliser={self.normaliser}"
