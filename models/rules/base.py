"""What an update rule is: how a sequence of (phi(k), v, beta) writes a fast-weight memory,
and how a query reads it.

Conventions (all rules): state S = W^T has shape [B, D_k, D_v], where D_k = d_dot is the
feature-map width and D_v the value width, so a read is o = S^T q (``q @ S``).
"""
from __future__ import annotations

from torch import Tensor, nn


class UpdateRule(nn.Module):
    """Base class for update rules; subclasses set the class attributes and write/read.

    uses_beta:  the rule needs a per-position write strength beta_t in (0, 1).
    key_norm, query_norm: the normalisation applied to phi(k) and phi(q) before writing and
        reading ("none" or "sum"; see models/normalisation.py).
    """

    name: str = ""
    uses_beta: bool = False
    key_norm: str = "none"
    query_norm: str = "none"

    def __init__(self, d_key: int, d_value: int):
        super().__init__()
        self.d_key = d_key
        self.d_value = d_value

    def write(self, k: Tensor, v: Tensor, beta: Tensor | None):
        """Memory state after the whole sequence. k [B, L, D_k], v [B, L, D_v], beta [B, L]."""
        raise NotImplementedError

    def read(self, state, q: Tensor) -> Tensor:
        """Retrieved values [B, Q, D_v] for queries q [B, Q, D_k]."""
        raise NotImplementedError

    def causal(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None) -> Tensor:
        """Per-position outputs o_t = read(S_t, q_t) [B, L, D_v] for a token stream, where S_t
        holds the writes of positions <= t (strictly < t for the fwl rule, as in the FWL)."""
        raise NotImplementedError(f"update rule {self.name!r} has no causal form")

    def state_size(self) -> int:
        """Floats in the fast memory of one sequence."""
        return self.d_key * self.d_value
