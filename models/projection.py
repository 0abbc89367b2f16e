"""The retrieval model's key projection as table lookups (models/retrieval.py).

The input at position t is x_t = [onehot(v_t); e(k_t)], so a projection W x_t + b is a column
of W's value part plus a row of the projected embedding table:

    W x_t + b = columns[v_t] + table[k_t],   columns = W[:, :S]^T,  table = E W[:, S:]^T + b

(``lookup_sum``, one C pass where the compiled steps run: ``ProjectLookup``). ``ProjectedKeys``
keeps the keys in that form, unformed (the table as its factors E, W[:, S:] and b), so that a
memory whose only use of the keys is q . k_t (softmax attention) reads q . columns[v_t] +
q . table[k_t] from the tables' products with q, never forming the [B, L, D] keys; and with few
queries, q . table[k] = q . b + (q W[:, S:]) . E[k] without forming the table either.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from models.rules.native import gather_add_backward, gather_add_forward, steps


def lookup_sum(columns: Tensor, table: Tensor, value_ids: Tensor, key_ids: Tensor,
               members: int = 1) -> Tensor:
    """columns[value_ids] + table[key_ids]: [S, out] tables, [N] ids -> [N, out]; in one C pass
    (``ProjectLookup``) where the compiled steps run, else two index_selects (the same floats).
    ``members``: the tables and ids of that many stacked models, in equal consecutive blocks,
    each member's ids in its own rows (``ProjectedKeys.lookups``); the backward then runs a
    member per thread.

    index_select rather than advanced indexing: its backward is an index_add, where
    indexing's backward (index_put with accumulate) is several times slower on CPU."""
    library = steps(table)
    if library is not None and value_ids.dtype == key_ids.dtype == torch.int64:
        return ProjectLookup.apply(columns.contiguous(), table.contiguous(), value_ids, key_ids,
                                   library, members)
    return columns.index_select(0, value_ids) + table.index_select(0, key_ids)


class ProjectLookup(torch.autograd.Function):
    """value_columns[values] + key_table[keys] ([S, out] tables, [N] ids -> [N, out]) in one
    pass, in C (models/rules/csrc/gather_add_impl.h); the backward adds the rows back in
    index_add's order. The same floats as the two index_selects and their sum."""

    @staticmethod
    def forward(ctx, value_columns, key_table, values, keys, library, members=1):
        values, keys = values.contiguous(), keys.contiguous()
        ctx.save_for_backward(values, keys)
        ctx.sizes, ctx.library = (value_columns.shape[0], key_table.shape[0]), library
        ctx.members = members
        return gather_add_forward(library, value_columns, values, key_table, keys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        values, keys = ctx.saved_tensors
        d_columns, d_table = gather_add_backward(ctx.library, grad.contiguous(), ctx.sizes[0],
                                                 values, ctx.sizes[1], keys, ctx.members)
        return d_columns, d_table, None, None, None, None


class ProjectedKeys(NamedTuple):
    """Keys k_t = columns[values_t] + table[keys_t] of M models trained together (one set of
    tables per member, M = 1 for a single model), kept as tables and ids: columns [M, S, D];
    the table as its factors, table = bias + embedding weight^T (embedding [M, S, E], weight
    [M, D, E], the projection's embedding part, bias [M, D]; a single model passes its own
    [S, D], [S, E], [D, E] and [D] tensors, so that their gradients arrive whole rather than
    through views of [1, ...] ones, four fewer operations each way in its training step);
    values, keys [M * B, L] ids, member m's sequences at rows m B .. (m + 1) B - 1.

    ``dense()`` forms the keys [M * B, L, D] (the lookups, for any memory); ``scores(q)`` gives
    q . k_t without them (for a memory that reads ``projected keys``: softmax attention)."""

    columns: Tensor
    embedding: Tensor
    weight: Tensor
    bias: Tensor
    values: Tensor
    keys: Tensor

    @property
    def members(self) -> int:
        """M, the stacked models whose tables these are."""
        return 1 if self.columns.dim() == 2 else self.columns.shape[0]

    @property
    def stacked_columns(self) -> Tensor:
        """The columns as [M, S, D] (a single model's [S, D] as [1, S, D])."""
        return self.columns[None] if self.columns.dim() == 2 else self.columns

    @property
    def table(self) -> Tensor:
        """The projected embedding table bias + embedding weight^T, [M, S, D]."""
        if self.embedding.dim() == 2:
            return self._single_table()[None]
        return torch.baddbmm(self.bias[:, None, :], self.embedding, self.weight.transpose(1, 2))

    def _single_table(self) -> Tensor:
        """A single model's table, [S, D]: the product nn.Linear would run."""
        return torch.addmm(self.bias, self.embedding, self.weight.T)

    def lookups(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(columns, table, values, keys) such that k_t = columns[values_t] + table[keys_t]:
        the flattened [M * S, D] tables and the [M * B, L] ids, each member's shifted to its
        rows (the form the kernels that read projected keys take). A single model's own 2-D
        tensors are used as they are."""
        M, (S, D) = self.members, self.columns.shape[-2:]
        values, keys = self.values, self.keys
        if M > 1:
            member = torch.arange(M, device=values.device).repeat_interleave(values.shape[0] // M)
            values, keys = values + S * member[:, None], keys + S * member[:, None]
        columns = self.columns if self.columns.dim() == 2 else self.columns.reshape(M * S, D)
        table = (self._single_table() if self.embedding.dim() == 2
                 else self.table.reshape(M * S, D))
        return columns, table, values, keys

    def dense(self) -> Tensor:
        """The keys [M * B, L, D]: ``lookup_sum`` over the flattened tables (``lookups``)."""
        columns, table, values, keys = self.lookups()
        flat = lookup_sum(columns, table, values.flatten(), keys.flatten(), self.members)
        return flat.view(*self.values.shape, columns.shape[1])

    def reads_factors(self, num_queries: int) -> bool:
        """Whether ``scores`` of num_queries queries per member reads the table's factors
        (N D E + N E S multiply-adds) rather than the table (S E D + N D S)."""
        S, D = self.columns.shape[-2:]
        E, N = self.embedding.shape[-1], num_queries
        return N * E * (D + S) < S * E * D + N * D * S

    def scores(self, q: Tensor) -> Tensor:
        """q_i . k_t for queries q [M * B, Q, D] -> [M * B, Q, L], as q . columns[v_t] +
        q . table[k_t]: each member's N = B Q queries against its tables, then two gathers,
        instead of forming the [M * B, L, D] keys and their products. The same function as
        q @ dense()^T, rounded differently.

        The key half comes from the table, [N, D] x [D, S] after the table's S E D
        multiply-adds, or from its factors, q . b + (q W) E^T, N D E + N E S: the factors
        where they cost less, which is when N (D + S) < S D roughly (training's one query per
        sequence at S >= 100; not evaluation's S queries)."""
        columns = self.stacked_columns
        M, S, D = columns.shape
        MB, Q, _ = q.shape
        L = self.values.shape[1]
        N = MB // M * Q
        queries = q.reshape(M, N, D)
        if self.reads_factors(N):
            # Transposed, [M, S, N]: the embedding's gradient comes out in its own layout.
            columns_q = queries.transpose(1, 2)                                 # [M, D, N]
            if self.embedding.dim() == 2:
                q_one = columns_q[0]                                            # [D, N]
                by_table = torch.addmm(self.bias[None, :] @ q_one, self.embedding,
                                       self.weight.T @ q_one)[None]
            else:
                by_table = torch.baddbmm(torch.bmm(self.bias[:, None, :], columns_q),
                                         self.embedding,
                                         torch.bmm(self.weight.transpose(1, 2), columns_q))
            products = torch.cat([torch.bmm(columns, columns_q), by_table], dim=1)
            products = products.transpose(1, 2).contiguous()                    # [M, N, 2 S]
        else:
            tables = torch.cat([columns, self.table], dim=1)                    # [M, 2 S, D]
            products = torch.bmm(queries, tables.transpose(1, 2))               # [M, N, 2 S]
        products = products.view(MB, Q, 2 * S)                                   # [M * B, Q, 2 S]
        by_value = products.gather(2, self.values[:, None, :].expand(MB, Q, L))
        by_key = products.gather(2, (self.keys + S)[:, None, :].expand(MB, Q, L))
        return by_value + by_key
