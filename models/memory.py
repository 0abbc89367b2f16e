"""Memories that store a sequence of (key, value) pairs and answer queries.

``FastWeightMemory`` composes ANY feature map with ANY update rule: phi is applied to keys and
queries, each is normalised as the rule asks, the rule writes the whole sequence into a fast
weight matrix, and every query reads that one matrix (the memory of a sequence is built once,
however many queries it gets). ``SoftmaxMemory`` is the softmax-attention baseline, whose
"memory" is the whole sequence.

Values may be given densely (v [B, L, D_v]) or as ``OneHot(ids, size)``, the retrieval task's
fixed one-hot value vectors. One-hot values let a rule with a ``write_one_hot(k, ids, beta)``
method (sum, delta, fwm) write by scatter / gather instead of multiplying by a mostly-zero
[B, L, S] matrix, and let softmax attention scatter its weights (A V with one-hot V). A rule
without that method gets the dense matrix: any user rule still works unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OneHot(NamedTuple):
    """Values v_t = one_hot(ids[:, t], size), kept as ids. ids [B, L] long."""

    ids: Tensor
    size: int

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The explicit value matrix [B, L, size] (the reference form)."""
        return F.one_hot(self.ids, self.size).to(dtype)


def per_call_features(memory: nn.Module):
    """The memory's feature map if it draws new random features at every forward, else None."""
    phi = getattr(memory, "phi", None)
    if getattr(phi, "random", False) and getattr(phi, "redraw_policy", "per_call") == "per_call":
        return phi
    return None


def write_memory(rule: nn.Module, k: Tensor, v: Tensor | OneHot, beta: Tensor | None):
    """rule.write(k, v, beta), through the rule's one-hot fast path when it has one written
    with its ``write`` (a subclass that overrides write alone gets the dense values)."""
    if isinstance(v, OneHot):
        fast = getattr(rule, "write_one_hot", None)
        if fast is not None and written_together(rule, "write_one_hot", "write"):
            return fast(k, v.ids, beta)
        v = v.dense(k.dtype)
    return rule.write(k, v, beta)

from models.normalisation import QUERY_EPS, normalise
from models.projection import ProjectedKeys


class PairScores(torch.autograd.Function):
    """q @ k^T, with k's gradient computed as g^T q: a fresh [B, L, D] tensor in k's layout.

    Autograd's gradient for q @ k^T is (q^T g)^T, a transposed view (stride 1 along L), and
    every pass behind it (a feature map's backward, the projection's) crawls over it: several
    times slower than the same products written in k's layout. The backward is itself
    differentiable (plain products)."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.save_for_backward(q, k)
        return q @ k.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        d_q = grad @ k if ctx.needs_input_grad[0] else None                    # [B, Q, D]
        d_k = None
        if ctx.needs_input_grad[1]:                                             # [B, L, D]
            # One query (training): an outer product, 3-4x faster as a broadcast product than
            # as a batched matrix product with inner size 1; the same floats.
            d_k = grad.transpose(1, 2) * q if q.shape[1] == 1 else grad.transpose(1, 2) @ q
        return d_q, d_k


def pair_scores(q: Tensor, k: Tensor) -> Tensor:
    """q_i . k_t for every pair: q [B, Q, D], k [B, L, D] -> [B, Q, L] (``PairScores``; plain
    q @ k^T under functorch transforms, as the vectorised seeds' vmap)."""
    if torch._C._are_functorch_transforms_active():
        return q @ k.transpose(1, 2)
    return PairScores.apply(q, k)


def reads_projected_keys(memory: nn.Module) -> bool:
    """True if the memory's forward takes the keys as ``ProjectedKeys`` (models/projection.py:
    tables and ids, read with ``scores(q)``) as well as a [B, L, D] tensor: it says so
    (``reads_projected_keys = True``) in the class that defines its forward."""
    return (getattr(memory, "reads_projected_keys", False)
            and written_together(memory, "reads_projected_keys", "forward"))


def kernel_takes_projected_keys(phi: nn.Module) -> bool:
    """True if the feature map's ``kernel`` takes the keys as ``ProjectedKeys`` as well as a
    [B, L, D] tensor: it says so (``kernel_reads_projected_keys = True``) in the class that
    defines its kernel."""
    return (getattr(phi, "kernel_reads_projected_keys", False)
            and written_together(phi, "kernel_reads_projected_keys", "kernel"))


def maps_projected_keys(phi: nn.Module) -> bool:
    """True if the feature map gives phi(k) of keys given as ``ProjectedKeys`` itself
    (``projected(k)``, defined in the class that defines its forward)."""
    return hasattr(phi, "projected") and written_together(phi, "projected", "forward")


def written_together(obj, fast: str, *reference: str) -> bool:
    """True if the class that defines obj's method ``fast`` also defines (or inherits) each
    ``reference`` method: a subclass that overrides forward (or read) but not the fast form
    keeps a fast form that no longer computes the same thing, and must not use it."""
    mro = type(obj).__mro__
    owner = lambda name: next((c for c in mro if name in vars(c)), object)
    return all(issubclass(owner(fast), owner(name)) for name in reference)


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

    # The retrieval model's keys may come as ``ProjectedKeys`` (tables and ids): formed here,
    # unless phi's kernel reads them so (``kernel_reads_projected_keys``: FAVOR+).
    reads_projected_keys = True

    def forward(self, k: Tensor | ProjectedKeys, v: Tensor | OneHot, beta: Tensor | None,
                q: Tensor) -> Tensor:
        """k [B, L, D_key] or ProjectedKeys, v [B, L, D_v] or OneHot, beta [B, L] or None,
        q [B, Q, D_key] -> [B, Q, D_v]."""
        projected = isinstance(k, ProjectedKeys)
        L = k.values.shape[1] if projected else k.shape[1]
        if self.use_kernel(v, q.shape[1], L):
            if projected and not kernel_takes_projected_keys(self.phi):
                k = k.dense()
            return self.rule.attend_one_hot(self.phi.kernel(q, k), v.ids)
        phi_k = self.key_features(k)
        phi_q = self.normalised(q, self.rule.query_norm, QUERY_EPS)
        if self.use_attention(v, q.shape[1], L):
            return self.rule.attend_one_hot(pair_scores(phi_q, phi_k), v.ids)
        if self.use_answer(v, q.shape[1], L):
            return self.rule.answer_one_hot(phi_q, phi_k, v.ids, beta)
        state = write_memory(self.rule, phi_k, v, beta)
        return self.rule.read(state, phi_q)

    def use_kernel(self, v, num_queries: int, length: int) -> bool:
        """Answer in the attention form from phi's own kernel (FeatureMap.kernel_width), for a
        rule without key or query normalisation, where ``attention_cheaper`` with the kernel's
        width (no features either)."""
        width = getattr(self.phi, "kernel_width", None)
        return (width is not None
                and self.rule.key_norm == "none" and self.rule.query_norm == "none"
                and written_together(self.phi, "kernel", "forward")
                and self.attention_cheaper(v, num_queries, length, width))

    def use_attention(self, v, num_queries: int, length: int) -> bool:
        """Answer in the attention form from the (normalised) features' scores phi(q) . phi(k_t),
        where ``attention_cheaper`` with width d_dot."""
        return self.attention_cheaper(v, num_queries, length, self.d_dot)

    def attention_cheaper(self, v, num_queries: int, length: int, width: int) -> bool:
        """For a rule with an attention form for one-hot values (sum: ``attend_one_hot``), True
        when scores costing ``width`` floats per (query, key) pair materialise fewer floats per
        sequence than the memory and its answers: Q L width <= L d_dot + d_dot D_v + Q D_v.
        True for training's one query per sequence, where the D_v x d_dot state, built, read
        and differentiated, costs more than the scores; evaluation's hundreds of queries read
        one memory instead."""
        return (isinstance(v, OneHot) and hasattr(self.rule, "attend_one_hot")
                and written_together(self.rule, "attend_one_hot", "read", "write_one_hot")
                and num_queries * length * width
                <= (length + v.size) * self.d_dot + num_queries * v.size)

    def use_answer(self, v, num_queries: int, length: int) -> bool:
        """Answer the queries without building the memory: for a rule with that form for
        one-hot values (delta: the query carried backwards through the writes) when the rule
        says it costs less (few queries per sequence, as in training)."""
        cheaper = getattr(self.rule, "answers_cheaper", None)
        return (isinstance(v, OneHot) and hasattr(self.rule, "answer_one_hot") and cheaper is not None
                and written_together(self.rule, "answer_one_hot", "read", "write_one_hot")
                and cheaper(num_queries, length))

    def key_features(self, k: Tensor | ProjectedKeys) -> Tensor:
        """The keys' features, normalised as the rule asks: [B, L, d_dot]. Keys given as
        ``ProjectedKeys`` are mapped straight from their tables by a map that can
        (``maps_projected_keys``: ELU + 1, tanh), else formed first."""
        kind = self.rule.key_norm
        if isinstance(k, ProjectedKeys):
            if maps_projected_keys(self.phi) and not (kind == "sum"
                                                       and hasattr(self.phi, "sum_normalised")):
                return normalise(self.phi.projected(k), kind, 0.0)
            k = k.dense()
        return self.normalised(k, kind, 0.0)

    def normalised(self, x: Tensor, kind: str, eps: float) -> Tensor:
        """phi(x) normalised as the rule asks. A map with its own ``sum_normalised`` computes
        phi(x) / sum(phi(x)) its own way: stably (FAVOR+: a softmax over [Omega x; -Omega x],
        where every per-vector constant cancels and nothing can overflow) or in one pass with
        the features (DPFP, the floats of the two steps)."""
        if kind == "sum" and hasattr(self.phi, "sum_normalised"):
            return self.phi.sum_normalised(x, eps)
        return normalise(self.phi(x), kind, eps)

    def causal(self, k: Tensor, v: Tensor, beta: Tensor | None, q: Tensor) -> Tensor:
        """Token-stream form: k, q [B, T, D_key], v [B, T, D_v] -> o [B, T, D_v], where o_t
        reads the memory after the write at t."""
        phi_k = self.normalised(k, self.rule.key_norm, 0.0)
        phi_q = self.normalised(q, self.rule.query_norm, QUERY_EPS)
        return self.rule.causal(phi_q, phi_k, v, beta)


class SoftmaxMemory(nn.Module):
    """y = sum_t softmax_t(k_t . q / sqrt(D_key)) v_t (Vaswani et al. 2017).

    The keys enter only through q . k_t, so they may come unformed, as ``ProjectedKeys``
    (models/projection.py). With one query per sequence (training) the scores are then read
    from the products of q with the key projection's two tables, without the [B, L, D] keys
    (Setting 1, Softmax, per training step, interleaved runs on a noisy machine: S = 600
    9.3-11.4 to 7.5-9.0 ms, one run at 11.5; S = 300 3.2-4.5 to 2.8-3.2 ms), and from the
    embedding table's factors rather than the projected table (``ProjectedKeys.reads_factors``:
    interleaved on the 2-core Zen 4, S = 300 3.6-4.2 against 4.3-5.3 ms, S = 600 8.1-10.8
    against 9.1-12.8 ms)."""

    uses_beta = False
    reads_projected_keys = True

    def __init__(self, d_key: int):
        super().__init__()
        self.d_key = d_key

    d_dot = None  # no fixed-size state: it grows with the sequence

    def state_size(self, length: int = 0, d_value: int = 0) -> int:
        return length * (self.d_key + d_value)

    def causal(self, k: Tensor, v: Tensor, beta: Tensor | None, q: Tensor) -> Tensor:
        """Causal softmax attention over a token stream: o_t attends to positions <= t."""
        scores = q @ k.transpose(1, 2) / math.sqrt(self.d_key)           # [B, T, T]
        future = torch.ones_like(scores, dtype=torch.bool).triu(1)
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v

    def forward(self, k: Tensor | ProjectedKeys, v: Tensor | OneHot, beta: Tensor | None,
                q: Tensor) -> Tensor:
        if isinstance(k, ProjectedKeys) and q.shape[1] > 1:
            # Many queries per sequence (evaluation): the tables' products and the gathers grow
            # with Q, and forming the keys once is cheaper (S = 600: 28 against 38-42 ms).
            k = k.dense()
        scores = k.scores(q) if isinstance(k, ProjectedKeys) else pair_scores(q, k)  # [B, Q, L]
        weights = torch.softmax(scores / math.sqrt(self.d_key), dim=-1)  # [B, Q, L]
        if isinstance(v, OneHot):
            # A V with one-hot V: each weight a_{qt} lands in value column ids_t.
            B, Q, L = weights.shape
            index = v.ids[:, None, :].expand(B, Q, L)                    # [B, Q, L]
            return weights.new_zeros(B, Q, v.size).scatter_add(2, index, weights)
        return weights @ v                                               # [B, Q, D_v]
