"""A one-layer fast-weight memory for multi-query associative recall (tasks/mqar.py).

MQAR is a token stream, so the memory is causal: at every position t the model writes one
key-value pair and reads once. The pair written at t binds the previous token to the current
one, (x_{t-1} -> x_t): the binding that multi-layer models learn with a short convolution or
an induction head is given, as the retrieval task of Schlag et al. (2021) gives its pairs, so
the experiment measures the memory and not the binding. With the paper's model, per position:

    k_t = W_K [e(x_{t-1}); e(x_t)],   v_t = onehot(x_t),   beta_t = sigmoid(W_b [e(x_{t-1}); e(x_t)])
    q_t = W_Q e(x_t),                 y_t = memory read at t (after the write at t)

Values are one-hot over the whole vocabulary (D_v = V), the loss is the paper's squared error
0.5 |y_t - onehot(label_t)|^2 at labelled positions, and a query is answered correctly when
argmax y_t is its value. Every feature map composes with every update rule, as in
models/retrieval.py. Dimensions: B batch, T tokens, V vocabulary, D_key key width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.memory import FastWeightMemory, SoftmaxMemory, per_call_features
from tasks.mqar import MQARBatch


class MQARModel(nn.Module):
    def __init__(self, vocab_size: int, memory: nn.Module, d_key: int = 64, d_emb: int = 64,
                 uses_beta: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.d_key = d_key
        self.embedding = nn.Embedding(vocab_size, d_emb)
        self.W_K = nn.Linear(2 * d_emb, d_key)
        self.W_Q = nn.Linear(d_emb, d_key)
        self.W_b = nn.Linear(2 * d_emb, 1) if uses_beta else None
        self.memory = memory
        nn.init.normal_(self.embedding.weight, 0.0, 1.0)
        bound = 1 / math.sqrt(d_key)
        nn.init.uniform_(self.W_K.weight, -bound, bound)
        nn.init.uniform_(self.W_Q.weight, -bound, bound)
        self.redraw_generator: torch.Generator | None = None
        self.context_length = 0    # tokens a softmax memory stores (set by the task)

    @property
    def d_dot(self) -> int | None:
        return self.memory.d_dot

    def state_size(self, length: int | None = None) -> int:
        """Floats in the memory of one sequence (softmax: its keys and values, for ``length``)."""
        if isinstance(self.memory, SoftmaxMemory):
            return self.memory.state_size(length or self.context_length, self.vocab_size)
        return self.memory.state_size()

    def forward(self, batch: MQARBatch) -> Tensor:
        """y [B, T, V]: the memory's answer at every position."""
        phi = per_call_features(self.memory)
        if phi is not None:
            phi.redraw(self.redraw_generator)
        tokens = batch.inputs                                                 # [B, T]
        e = self.embedding(tokens)                                            # [B, T, d_emb]
        previous = F.pad(e, (0, 0, 1, 0))[:, :-1]                             # e(x_{t-1}), 0 at t = 0
        pair = torch.cat([previous, e], dim=-1)                               # [B, T, 2 d_emb]
        k = self.W_K(pair)                                                    # [B, T, D_key]
        q = self.W_Q(e)                                                       # [B, T, D_key]
        beta = torch.sigmoid(self.W_b(pair)).squeeze(-1) if self.W_b is not None else None
        v = F.one_hot(tokens, self.vocab_size).to(k.dtype)                    # [B, T, V]
        return self.memory.causal(k, v, beta, q)

    def query_losses_and_hits(self, batch: MQARBatch) -> tuple[Tensor, Tensor]:
        """Squared loss and correctness at every labelled position: two [N_queries] tensors."""
        y = self(batch)[batch.query_mask]                                     # [N, V]
        labels = batch.labels[batch.query_mask]                               # [N]
        losses = 0.5 * (y - F.one_hot(labels, self.vocab_size).to(y.dtype)).pow(2).sum(-1)
        return losses, y.argmax(-1) == labels

    def loss(self, batch: MQARBatch) -> Tensor:
        return self.query_losses_and_hits(batch)[0].mean()


def build_mqar_model(vocab_size: int, feature_map: str, rule: str, d_key: int = 64,
                     d_emb: int | None = None, feature_options: dict | None = None,
                     rule_options: dict | None = None) -> MQARModel:
    """Any feature map with any update rule (or "softmax": causal softmax attention)."""
    from models.feature_maps import build_feature_map
    from models.rules import build_rule

    d_emb = 64 if d_emb is None else d_emb
    if feature_map == "softmax":
        if rule != "sum":
            raise ValueError("the softmax baseline has no update rule: use --rule sum")
        if feature_options or rule_options:
            raise ValueError("softmax takes no feature-map or update-rule options")
        return MQARModel(vocab_size, SoftmaxMemory(d_key), d_key, d_emb)
    phi = build_feature_map(feature_map, d_key, **(feature_options or {}))
    update_rule = build_rule(rule, phi.d_dot, vocab_size, **(rule_options or {}))
    return MQARModel(vocab_size, FastWeightMemory(phi, update_rule), d_key, d_emb,
                     uses_beta=update_rule.uses_beta)
