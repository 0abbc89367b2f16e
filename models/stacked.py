"""M retrieval models of identical shapes as one module, for training seeds together.

Every parameter of ``RetrievalModel`` (key embedding, W_K, W_Q, W_b) gets a leading member
dimension M; the memory (feature map + update rule, or softmax attention) is shared, which is
exact only when it holds nothing per member: no parameters and the same buffers in every member
(``StackedRetrievalModel.supports``). It then sees the M batches as one batch of M * B
sequences, so one step of M members runs the same number of operations as one step of one
model, each M times larger: at the paper's sizes most of a small configuration's step is
per-operation overhead, which this shares.

Shapes: M members, B sequences per member, L positions, Q queries, S pairs, D_key key width.
The projections are ``RetrievalModel._project``'s lookups with per-member tables: member m's
rows sit at offset m * S of the flattened [M * S, .] table.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.memory import OneHot
from models.retrieval import RetrievalModel


def _stack(tensors) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class StackedRetrievalModel(nn.Module):
    """Member m equals ``models[m]`` at construction; trained as one module afterwards."""

    def __init__(self, models: list[RetrievalModel]):
        super().__init__()
        if not self.supports(models):
            raise ValueError("these models cannot share one memory (per-member parameters, "
                             "buffers or random feature draws)")
        first = models[0]
        self.num_members = len(models)
        self.num_pairs = first.num_pairs
        self.embedding = _stack(m.embedding.weight for m in models)             # [M, S, d_emb]
        self.W_K_weight = _stack(m.W_K.weight for m in models)                  # [M, D_key, S + d_emb]
        self.W_K_bias = _stack(m.W_K.bias for m in models)                      # [M, D_key]
        self.W_Q_weight = _stack(m.W_Q.weight for m in models)                  # [M, D_key, d_emb]
        self.W_Q_bias = _stack(m.W_Q.bias for m in models)                      # [M, D_key]
        self.uses_beta = first.W_b is not None
        if self.uses_beta:
            self.W_b_weight = _stack(m.W_b.weight for m in models)              # [M, 1, S + d_emb]
            self.W_b_bias = _stack(m.W_b.bias for m in models)                  # [M, 1]
        self.memory = copy.deepcopy(first.memory)

    @staticmethod
    def supports(models: list[RetrievalModel]) -> bool:
        """True when every member's memory is the same function: same class, no parameters,
        no random feature map (per-call or fixed, each member has its own draws), equal
        buffers (e.g. Taylor's index tables)."""
        memories = [m.memory for m in models]
        if any(type(mem) is not type(memories[0]) for mem in memories):
            return False
        if any(True for _ in memories[0].parameters()):
            return False
        if getattr(getattr(memories[0], "phi", None), "random", False):
            return False                    # each member draws its own features
        reference = dict(memories[0].named_buffers())
        return all(reference.keys() == dict(mem.named_buffers()).keys()
                   and all(torch.equal(reference[name], buffer) for name, buffer in mem.named_buffers())
                   for mem in memories[1:])

    def _offsets(self, ids: Tensor) -> Tensor:
        """Member m's ids [M, ...] shifted to its rows of a flattened [M * S, .] table."""
        shape = (self.num_members,) + (1,) * (ids.dim() - 1)
        return ids + self.num_pairs * torch.arange(self.num_members, device=ids.device).view(shape)

    def _project(self, weight: Tensor, bias: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Per member, linear([onehot(v); e(k)]) as two lookups: keys, values [M, B, L] ->
        [M * B, L, out]."""
        M, S = self.num_members, self.num_pairs
        out = weight.shape[1]
        value_columns = weight[:, :, :S].transpose(1, 2)                        # [M, S, out]
        key_table = torch.baddbmm(bias[:, None, :], self.embedding,
                                  weight[:, :, S:].transpose(1, 2))            # [M, S, out]
        flat = (value_columns.reshape(M * S, out).index_select(0, self._offsets(values).flatten())
                + key_table.reshape(M * S, out).index_select(0, self._offsets(keys).flatten()))
        return flat.view(M * keys.shape[1], keys.shape[2], out)

    def forward(self, keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
        """keys, values [M, B, L], queries [M, B, Q] (long ids) -> answers y [M, B, Q, S]."""
        M, B, Q = queries.shape
        k = self._project(self.W_K_weight, self.W_K_bias, keys, values)          # [M * B, L, D_key]
        emb_q = self.embedding.reshape(M * self.num_pairs, -1).index_select(
            0, self._offsets(queries).flatten()).view(M, B * Q, -1)             # [M, B * Q, d_emb]
        q = torch.baddbmm(self.W_Q_bias[:, None, :], emb_q,
                          self.W_Q_weight.transpose(1, 2)).view(M * B, Q, -1)   # [M * B, Q, D_key]
        beta = None
        if self.uses_beta:
            beta = torch.sigmoid(self._project(self.W_b_weight, self.W_b_bias, keys, values)
                                 .squeeze(-1))                                    # [M * B, L]
        v = OneHot(values.reshape(M * B, -1), self.num_pairs)
        return self.memory(k, v, beta, q).view(M, B, Q, -1)
