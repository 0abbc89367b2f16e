"""The one-layer retrieval model of Schlag, Irie & Schmidhuber (2021, arXiv 2102.11174, Sec. 6.1),
built as the authors' code builds it (ischlag/fast-weight-transformers, synthetic/).

Values are fixed one-hot vectors v_t in R^S (no value projection), so the memory is S x d_dot.
The input at position t is x_t = [onehot(v_t); e(k_t)] with a trainable key embedding e of
size d_emb = int(2.2 S) (initialised N(0, 1)); the same table embeds the query. Then

    k_t = W_K x_t,   q = W_Q e(query),   beta_t = sigmoid(W_b x_t)   (nn.Linear, with bias)

and the memory (any feature map with any update rule, or softmax attention) answers q.
Loss: 0.5 * sum_j (y_j - v_j)^2, averaged over queries; a zero output scores exactly 0.5.

Because x_t is a one-hot value next to an embedding, W_K x_t is a column of W_K plus a row of
the projected embedding table: computed as two lookups, never as an (S + d_emb)-wide product
(in one C pass where the compiled steps run: models/projection.py, ``ProjectLookup``).
For the same reason the values reach the memory as ids (``OneHot``), never as a [B, L, S]
matrix: the sum rule, the delta rule, FWM and softmax attention then write or read by
scatter/gather (models/memory.py); and softmax attention, whose only use of the keys is q . k_t,
gets them as the two tables and the ids (``ProjectedKeys``, read without forming the keys).
``one_hot_values=False`` passes the dense values and keys instead (the reference path;
tests/test_fast_paths.py checks that both agree).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.memory import (FastWeightMemory, OneHot, SoftmaxMemory, per_call_features,
                           reads_projected_keys)
from models.projection import ProjectedKeys
from tasks.associative import RetrievalBatch


def embedding_size(num_pairs: int) -> int:
    """The original code's int((n_keys + n_values) * 1.1)."""
    return int((num_pairs + num_pairs) * 1.1)


class RetrievalModel(nn.Module):
    """Key embedding + projections + a memory. Shapes: B batch, L length, Q queries, S pairs."""

    def __init__(self, num_pairs: int, memory: nn.Module, d_key: int = 64,
                 d_emb: int | None = None, uses_beta: bool = False):
        super().__init__()
        S = num_pairs
        self.num_pairs = S
        self.d_key = d_key
        self.d_emb = embedding_size(S) if d_emb is None else d_emb
        self.embedding = nn.Embedding(S, self.d_emb)
        self.W_K = nn.Linear(S + self.d_emb, d_key)
        self.W_Q = nn.Linear(self.d_emb, d_key)
        self.W_b = nn.Linear(S + self.d_emb, 1) if uses_beta else None
        self.memory = memory
        nn.init.normal_(self.embedding.weight, 0.0, 1.0)
        if isinstance(memory, SoftmaxMemory):
            nn.init.xavier_uniform_(self.W_K.weight)   # as the original softmax baseline
            nn.init.xavier_uniform_(self.W_Q.weight)
        else:
            bound = 1 / math.sqrt(d_key)
            nn.init.uniform_(self.W_K.weight, -bound, bound)
            nn.init.uniform_(self.W_Q.weight, -bound, bound)
        self.redraw_generator: torch.Generator | None = None
        self.one_hot_values = True   # False: dense values [B, L, S] and keys (reference path)

    @property
    def d_dot(self) -> int | None:
        return self.memory.d_dot

    def state_size(self, length: int | None = None) -> int:
        """Floats in the memory of one sequence (softmax: the stored keys and values)."""
        if isinstance(self.memory, SoftmaxMemory):
            return self.memory.state_size(length or self.num_pairs, self.num_pairs)
        return self.memory.state_size()

    def _projected(self, linear: nn.Linear, keys: Tensor, values: Tensor) -> ProjectedKeys:
        """linear([onehot(v); e(k)]) for [B, L] ids, as its two [S, out] tables and the ids
        (models/projection.py)."""
        S = self.num_pairs
        value_columns = linear.weight[:, :S].T                              # [S, out]
        return ProjectedKeys(value_columns, self.embedding.weight, linear.weight[:, S:],
                             linear.bias, values, keys)

    def _project(self, linear: nn.Linear, keys: Tensor, values: Tensor) -> Tensor:
        """linear([onehot(v); e(k)]) as lookups (``lookup_sum``): [B, L] ids -> [B, L, out]."""
        return self._projected(linear, keys, values).dense()

    def forward(self, batch: RetrievalBatch) -> Tensor:
        """Retrieved value vectors y [B, Q, S] for every query of the batch."""
        phi = per_call_features(self.memory)
        if phi is not None:
            phi.redraw(self.redraw_generator)
        k = self._projected(self.W_K, batch.keys, batch.values)
        if not (self.one_hot_values and reads_projected_keys(self.memory)):
            k = k.dense()                                                    # [B, L, D_key]
        q = self.W_Q(self.embedding(batch.queries))                          # [B, Q, D_key]
        beta = (torch.sigmoid(self._project(self.W_b, batch.keys, batch.values).squeeze(-1))
                if self.W_b is not None else None)                           # [B, L]
        v = OneHot(batch.values, self.num_pairs)                             # ids [B, L]
        if not self.one_hot_values:
            v = v.dense(k.dtype)                                              # [B, L, S]
        return self.memory(k, v, beta, q)

    def query_losses(self, batch: RetrievalBatch) -> Tensor:
        """0.5 * |y - onehot(target)|^2 per query: [B, Q]."""
        return retrieval_losses(self(batch), batch)

    def loss(self, batch: RetrievalBatch) -> Tensor:
        """Mean query loss over the real (unmasked) queries."""
        return masked_mean(self.query_losses(batch), batch.query_mask)


def retrieval_losses(y: Tensor, batch: RetrievalBatch) -> Tensor:
    """The paper's loss 0.5 * |y - onehot(target)|^2 per query, y [B, Q, S] -> [B, Q]."""
    return target_losses(y, batch.targets)


def target_losses(y: Tensor, targets: Tensor) -> Tensor:
    """0.5 * |y - onehot(target)|^2 for y [..., S] and target ids [...] -> [...].

    y - onehot(target) without the one-hot tensor: subtract 1 at each target entry (the same
    floating-point operation as the dense subtraction)."""
    index = targets[..., None]                                               # [..., 1]
    error = y.scatter_add(-1, index, y.new_full(index.shape, -1.0))          # [..., S]
    return 0.5 * error.pow(2).sum(-1)


def masked_mean(losses: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of losses [B, Q] over the real queries (mask True); over the dimensions ``dim``
    alone if given (stacked members' losses [M, B, Q] with dim (1, 2): one mean each)."""
    mask = mask.to(losses.dtype)
    if dim is None:
        return (losses * mask).sum() / mask.sum()
    return (losses * mask).sum(dim) / mask.sum(dim)


def build_model(num_pairs: int, feature_map: str, rule: str, d_key: int = 64,
                d_emb: int | None = None, feature_options: dict | None = None,
                rule_options: dict | None = None) -> RetrievalModel:
    """Any feature map with any update rule; feature_map "softmax" is the attention baseline."""
    from models.feature_maps import build_feature_map
    from models.rules import build_rule

    if feature_map == "softmax":
        if rule != "sum":
            raise ValueError("the softmax baseline has no update rule: use --rule sum")
        if feature_options:
            raise ValueError(f"softmax takes no feature-map options, got {sorted(feature_options)}")
        if rule_options:
            raise ValueError(f"softmax takes no update-rule options, got {sorted(rule_options)}")
        return RetrievalModel(num_pairs, SoftmaxMemory(d_key), d_key, d_emb)
    phi = build_feature_map(feature_map, d_key, **(feature_options or {}))
    update_rule = build_rule(rule, phi.d_dot, num_pairs, **(rule_options or {}))
    memory = FastWeightMemory(phi, update_rule)
    return RetrievalModel(num_pairs, memory, d_key, d_emb, uses_beta=update_rule.uses_beta)
