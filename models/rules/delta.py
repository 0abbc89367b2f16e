"""The delta rule with a learned write strength (Schlag, Irie & Schmidhuber 2021,
arXiv 2102.11174, eqs. 23-25):

    u_t = beta_t (v_t - S_{t-1}^T k_t)        (new value minus what the memory returns)
    S_t = S_{t-1} + k_t u_t^T
    o_t = S_t^T q_t

with k, q sum-normalised phi(k), phi(q) and beta_t = sigmoid(W_b x_t). Unlike the sum rule it
can overwrite: writing (k, v2) after (k, v1) with beta = 1 leaves v2.

Fast form: the chunkwise-parallel algorithm (Yang et al. 2024, arXiv 2406.06484). For a chunk
of C positions entering with state S0, the recurrence inside the chunk is the triangular
system (I + tril(diag(beta) K K^T, -1)) U' = diag(beta) (V - K S0), solved explicitly:

    T  = (I + tril(diag(beta) K K^T, -1))^-1      (unit lower triangular)
    W  = T diag(beta) K,   U = T diag(beta) V      (the WY / UT representation)
    U' = U - W S0
    O  = Q S0 + tril(Q K^T) U',   S_next = S0 + K^T U'

Only the loop over chunks is sequential.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.rules.base import UpdateRule


def delta_rule_recurrent(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor,
                         initial_state: Tensor | None = None):
    """Reference loop. q, k [B, L, D_k], v [B, L, D_v], beta [B, L]
    -> (o [B, L, D_v] or None, S [B, D_k, D_v])."""
    B, L, D_k = k.shape
    S = k.new_zeros(B, D_k, v.shape[2]) if initial_state is None else initial_state
    outputs = []
    q_steps = q.unbind(1) if q is not None else [None] * L
    for q_t, k_t, v_t, b_t in zip(q_steps, k.unbind(1), v.unbind(1), beta.unbind(1)):
        retrieved = torch.einsum("bkv,bk->bv", S, k_t)
        u_t = b_t[:, None] * (v_t - retrieved)
        S = S + k_t[:, :, None] * u_t[:, None, :]
        if q_t is not None:
            outputs.append(torch.einsum("bkv,bk->bv", S, q_t))
    return (torch.stack(outputs, dim=1) if q is not None else None), S


def delta_rule_chunkwise(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor,
                         chunk_size: int = 64, initial_state: Tensor | None = None):
    """Chunkwise WY/UT form; same arguments and results as ``delta_rule_recurrent``."""
    B, L, D_k = k.shape
    S = k.new_zeros(B, D_k, v.shape[2]) if initial_state is None else initial_state
    outputs = []
    for start in range(0, L, chunk_size):
        K = k[:, start:start + chunk_size]                            # [B, C, D_k]
        V = v[:, start:start + chunk_size]                            # [B, C, D_v]
        b = beta[:, start:start + chunk_size, None]                   # [B, C, 1]
        C = K.shape[1]
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        A = (b * (K @ K.transpose(1, 2))).tril(-1)                     # [B, C, C]
        # Forming T explicitly (solve against I) is faster than solving against [bK, bV].
        T = torch.linalg.solve_triangular(eye + A, eye.expand(B, C, C), upper=False,
                                          unitriangular=True)
        W = T @ (b * K)                                               # [B, C, D_k]
        U = T @ (b * V)                                               # [B, C, D_v]
        U_new = U - W @ S                                             # [B, C, D_v]
        if q is not None:
            Q = q[:, start:start + chunk_size]
            outputs.append(Q @ S + (Q @ K.transpose(1, 2)).tril() @ U_new)
        S = S + K.transpose(1, 2) @ U_new
    return (torch.cat(outputs, dim=1) if q is not None else None), S


class DeltaRule(UpdateRule):
    """Delta rule on sum-normalised keys and queries; no attention normaliser on reads."""

    name = "delta"
    uses_beta = True
    key_norm = "sum"
    query_norm = "sum"

    def __init__(self, d_key: int, d_value: int, chunk_size: int = 64):
        super().__init__(d_key, d_value)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def write(self, k, v, beta):
        return delta_rule_chunkwise(None, k, v, beta, self.chunk_size)[1]

    def read(self, state, q):
        return q @ state

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
