"""M retrieval models of identical shapes as one module, for training seeds together.

Every parameter of ``RetrievalModel`` (key embedding, W_K, W_Q, W_b) gets a leading member
dimension M; the memory (feature map + update rule, or softmax attention) is shared, which is
exact only when it holds nothing per member: no parameters and the same buffers in every member
(``StackedRetrievalModel.supports``). It then sees the M batches as one batch of M * B
sequences, so one step of M members runs the same number of operations as one step of one
model, each M times larger: at the paper's sizes most of a small configuration's step is
per-operation overhead, which this shares. A random feature map (FAVOR+, random Fourier) is the
one per-member part allowed: each member keeps its own draws (``MemberFeatureMaps``), and only
the map runs once per member.

Shapes: M members, B sequences per member, L positions, Q queries, S pairs, D_key key width.
The projections are ``RetrievalModel._projected``'s tables, one pair per member
(``ProjectedKeys``: member m's rows sit at offset m * S of the flattened [M * S, .] tables).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.memory import (OneHot, kernel_takes_projected_keys, per_call_features,
                           reads_projected_keys)
from models.normalisation import normalise
from models.projection import ProjectedKeys
from models.retrieval import RetrievalModel


def _stack(tensors) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class MemberFeatureMaps(nn.Module):
    """The random feature maps of M members, each applied to its member's B rows of an
    [M * B, ...] batch (member m: rows m B .. (m + 1) B - 1), with its own draws: the stacked
    memory computes what each member's memory computes. Offers what the members offer (their
    kernel and its width, a stable sum normalisation)."""

    random = True

    def __init__(self, maps: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(maps)
        first = maps[0]
        self.d_key, self.d_dot = first.d_key, first.d_dot
        self.nonnegative = first.nonnegative
        self.redraw_policy = getattr(first, "redraw_policy", "per_call")
        self.kernel_width = getattr(first, "kernel_width", None)

    def _split(self, *tensors: Tensor):
        """Per member, its rows of each [M * B, ...] tensor."""
        M = len(self.members)
        return zip(*(x.chunk(M, dim=0) for x in tensors))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([phi(part) for phi, (part,) in zip(self.members, self._split(x))])

    @property
    def kernel_reads_projected_keys(self) -> bool:
        """Whether every member's kernel takes keys as ``ProjectedKeys`` (FastWeightMemory)."""
        return all(kernel_takes_projected_keys(phi) for phi in self.members)

    def kernel(self, q: Tensor, k: Tensor | ProjectedKeys) -> Tensor:
        # A map class may compute its members' kernels at once (FAVORPlus.members_kernel).
        together = getattr(type(self.members[0]), "members_kernel", None)
        if together is not None and all(type(phi) is type(self.members[0]) for phi in self.members):
            y = together(list(self.members), q, k)
            if y is not None:
                return y
        if not isinstance(k, ProjectedKeys):
            return torch.cat([phi.kernel(*parts)
                              for phi, parts in zip(self.members, self._split(q, k))])
        tables, ids = k[:4], k[4:]                # [M, ...] tables, [M * B, L] ids
        return torch.cat([phi.kernel(q_m, ProjectedKeys(*(x[m:m + 1] for x in tables), *ids_m))
                          for m, (phi, (q_m, *ids_m))
                          in enumerate(zip(self.members, self._split(q, *ids)))])

    def sum_normalised(self, x: Tensor, eps: float = 0.0) -> Tensor:
        if not hasattr(self.members[0], "sum_normalised"):
            return normalise(self(x), "sum", eps)
        return torch.cat([phi.sum_normalised(part, eps)
                          for phi, (part,) in zip(self.members, self._split(x))])

    def redraw(self, generators: list[torch.Generator | None]) -> None:
        """New draws for every member, member m's from generators[m] (its own stream)."""
        for phi, generator in zip(self.members, generators):
            phi.redraw(generator)


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
        if self._random_features(models):
            self.memory.phi = MemberFeatureMaps([copy.deepcopy(m.memory.phi) for m in models])

    @staticmethod
    def _random_features(models: list[RetrievalModel]) -> bool:
        return getattr(getattr(models[0].memory, "phi", None), "random", False)

    @staticmethod
    def supports(models: list[RetrievalModel]) -> bool:
        """True when every member's memory is the same function up to random feature draws:
        same class, no parameters, equal buffers (e.g. Taylor's index tables) other than a
        random feature map's, which stays per member (``MemberFeatureMaps``)."""
        memories = [m.memory for m in models]
        if any(type(mem) is not type(memories[0]) for mem in memories):
            return False
        if any(True for _ in memories[0].parameters()):
            return False
        random = StackedRetrievalModel._random_features(models)
        if random and any(type(mem.phi) is not type(memories[0].phi) for mem in memories):
            return False
        shared = lambda mem: {name: buffer for name, buffer in mem.named_buffers()
                              if not (random and name.startswith("phi."))}
        reference = shared(memories[0])
        return all(reference.keys() == shared(mem).keys()
                   and all(torch.equal(reference[name], buffer)
                           for name, buffer in shared(mem).items())
                   for mem in memories[1:])

    def redraw_features(self, generators: list[torch.Generator | None]) -> None:
        """For a per-call random feature map: member m's new draws from generators[m] (its
        model's ``redraw_generator``: the draws its own forward would make)."""
        phi = per_call_features(self.memory)
        if phi is not None:
            phi.redraw(generators)

    def _offsets(self, ids: Tensor) -> Tensor:
        """Member m's ids [M, ...] shifted to its rows of a flattened [M * S, .] table."""
        shape = (self.num_members,) + (1,) * (ids.dim() - 1)
        return ids + self.num_pairs * torch.arange(self.num_members, device=ids.device).view(shape)

    def _projected(self, weight: Tensor, bias: Tensor, keys: Tensor, values: Tensor) -> ProjectedKeys:
        """Per member, linear([onehot(v); e(k)]) as its two tables and the ids: keys, values
        [M, B, L] -> ProjectedKeys of [M, S, out] tables and [M * B, L] ids."""
        S = self.num_pairs
        value_columns = weight[:, :, :S].transpose(1, 2)                        # [M, S, out]
        return ProjectedKeys(value_columns, self.embedding, weight[:, :, S:], bias,
                             values.flatten(0, 1), keys.flatten(0, 1))

    def forward(self, keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
        """keys, values [M, B, L], queries [M, B, Q] (long ids) -> answers y [M, B, Q, S]."""
        M, B, Q = queries.shape
        k = self._projected(self.W_K_weight, self.W_K_bias, keys, values)
        if not reads_projected_keys(self.memory):
            k = k.dense()                                                        # [M * B, L, D_key]
        emb_q = self.embedding.reshape(M * self.num_pairs, -1).index_select(
            0, self._offsets(queries).flatten()).view(M, B * Q, -1)             # [M, B * Q, d_emb]
        q = torch.baddbmm(self.W_Q_bias[:, None, :], emb_q,
                          self.W_Q_weight.transpose(1, 2)).view(M * B, Q, -1)   # [M * B, Q, D_key]
        beta = None
        if self.uses_beta:
            beta = torch.sigmoid(self._projected(self.W_b_weight, self.W_b_bias, keys, values)
                                 .dense().squeeze(-1))                            # [M * B, L]
        v = OneHot(values.reshape(M * B, -1), self.num_pairs)
        return self.memory(k, v, beta, q).view(M, B, Q, -1)
