"""The Fast Weight Layer gradient rule (Clark et al. 2022, arXiv 2212.02475) as an update rule.

For one linear memory W with a squared-error inner loss, one SGD step of size eta on the losses
of all earlier positions, taken from learned slow weights W_0, is

    W_t = W_0 + eta * sum_{s<t} (v_s - W_0 k_s) k_s^T

the sum rule applied to the errors of the SLOW memory. With cross-entropy, the value is
onehot(v_s) - softmax(W_0 k_s) instead. No recurrence: the memory is parallel (one matrix
product), it equals eta times the sum rule when W_0 = 0, and matches the delta rule
(beta = eta) to first order in eta. It cannot overwrite: a key written twice adds both
errors, where the delta rule keeps only the last value.

State convention: S = W^T [B, D_k, D_v]; keys and queries are sum-normalised phi(k), phi(q)
as for the delta rule. W_0 starts at 0 (the rule starts as eta x the sum rule).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.rules.base import UpdateRule

LOSSES = ("squared", "cross_entropy")


def fwl_values(k: Tensor, v: Tensor, S0: Tensor, loss: str = "squared") -> Tensor:
    """The per-position negative inner gradients w.r.t. the memory's output: [B, L, D_v]."""
    prediction = k @ S0                                                # [B, L, D_v]
    if loss == "squared":
        return v - prediction
    return v - torch.softmax(prediction, dim=-1)


def fwl_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, S0: Tensor, eta: Tensor,
                       loss: str = "squared"):
    """Reference loop. q, k [B, L, D_k], v [B, L, D_v], S0 [D_k, D_v] -> (o [B, L, D_v], S_L).

    o_t reads W_t, built from positions s < t only (strictly causal, as in the FWL).
    """
    S = S0.expand(k.shape[0], *S0.shape)
    outputs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):
        outputs.append(torch.einsum("bkv,bk->bv", S, q_t))
        error = fwl_values(k_t[:, None], v_t[:, None], S0, loss)[:, 0]   # [B, D_v]
        S = S + eta * k_t[:, :, None] * error[:, None, :]
    return torch.stack(outputs, dim=1), S


def fwl_rule_parallel(q: Tensor | None, k: Tensor, v: Tensor, S0: Tensor, eta: Tensor,
                      loss: str = "squared"):
    """Parallel form: o = Q S0 + eta * tril(Q K^T, -1) E, S_L = S0 + eta K^T E."""
    errors = fwl_values(k, v, S0, loss)                                  # [B, L, D_v]
    S = S0 + eta * (k.transpose(1, 2) @ errors)
    if q is None:
        return None, S
    o = q @ S0 + eta * ((q @ k.transpose(1, 2)).tril(-1) @ errors)
    return o, S


class FWLRule(UpdateRule):
    """One learned-step-size gradient step from learned slow memory W_0 (Clark et al. 2022)."""

    name = "fwl"
    key_norm = "sum"
    query_norm = "sum"

    def __init__(self, d_key: int, d_value: int, loss: str = "squared", eta_init: float = 1.0):
        super().__init__(d_key, d_value)
        if loss not in LOSSES:
            raise ValueError(f"fwl loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss = loss
        self.S0 = nn.Parameter(torch.zeros(d_key, d_value))            # W_0^T, slow memory
        self.eta = nn.Parameter(torch.tensor(float(eta_init)))          # learned step size

    def write(self, k, v, beta=None):
        return fwl_rule_parallel(None, k, v, self.S0, self.eta, self.loss)[1]

    def read(self, state, q):
        return q @ state

    def causal(self, q, k, v, beta=None):
        return fwl_rule_parallel(q, k, v, self.S0, self.eta, self.loss)[0]

    def extra_repr(self) -> str:
        return f"loss={self.loss}"
