"""Memories that store a sequence of (key, value) pairs and answer queries.

``FastWeightMemory`` composes ANY feature map with ANY update rule: phi is applied to keys and
queries, each is normalised as the rule asks, the rule writes the whole sequence into a fast
weight matrix, and every query reads that one matrix (the memory of a sequence is built once,
however many queries it gets). ``SoftmaxMemory`` is the softmax-attention baseline, whose
"memory" is the whole sequence.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.normalisation import QUERY_EPS, normalise


class FastWeightMemory(nn.Module):
    """phi + normalisation + update rule. d_dot = phi.d_dot is the address-space size."""

    def __init__(self, feature_map: nn.Module, rule: nn.Module):
        super().__init__()
        self.phi = feature_map
        self.rule = rule

    @property
    def d_dot(self) -> int:
        return self.phi.d_dot

    def state_size(self) -> int:
        return self.rule.state_size()

    def forward(self, k: Tensor, v: Tensor, beta: Tensor | None, q: Tensor) -> Tensor:
        """k [B, L, D_key], v [B, L, D_v], beta [B, L] or None, q [B, Q, D_key] -> [B, Q, D_v]."""
        phi_k = normalise(self.phi(k), self.rule.key_norm)
        phi_q = normalise(self.phi(q), self.rule.query_norm, QUERY_EPS)
        state = self.rule.write(phi_k, v, beta)
        return self.rule.read(state, phi_q)


class SoftmaxMemory(nn.Module):
    """y = sum_t softmax_t(k_t . q / sqrt(D_key)) v_t (Vaswani et al. 2017)."""

    uses_beta = False

    def __init__(self, d_key: int):
        super().__init__()
        self.d_key = d_key

    d_dot = None  # no fixed-size state: it grows with the sequence

    def state_size(self, length: int = 0, d_value: int = 0) -> int:
        return length * (self.d_key + d_value)

    def forward(self, k: Tensor, v: Tensor, beta: Tensor | None, q: Tensor) -> Tensor:
        scores = q @ k.transpose(1, 2) / math.sqrt(self.d_key)           # [B, Q, L]
        return torch.softmax(scores, dim=-1) @ v                         # [B, Q, D_v]
