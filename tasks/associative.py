"""Associative retrieval: store S key-value pairs, then retrieve the value of a queried key.

The two settings of Schlag, Irie & Schmidhuber (ICML 2021, arXiv 2102.11174, Section 6.1):

- ``capacity`` (Setting 1): S distinct keys and S distinct values, L = S. Every sequence is a
  random bijection keys -> values; the query is a uniformly random key.
- ``overwrite`` (Setting 2): keys and values sampled WITH replacement, L = 2S. The query is the
  key at a uniformly random position; the target is the value at that key's LAST occurrence,
  so a model must overwrite what it stored earlier.

Key ids and value ids are both 0..S-1 (the original code offsets values by S; only the
one-hot vectors matter). Every generator takes an explicit ``torch.Generator`` and is
vectorised over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SETTINGS = ("capacity", "overwrite")


@dataclass
class RetrievalBatch:
    """A batch of retrieval sequences with its queries and targets.

    keys, values: [B, L] long, ids in 0..S-1 (position t stores keys[:, t] -> values[:, t]).
    queries, targets: [B, Q] long; targets[b, i] is the value of queries[b, i] at its last
        occurrence in sequence b.
    query_mask: [B, Q] bool; False marks padding where sequences have fewer than Q queries.
    num_pairs: S, the size of the key and value vocabularies.
    """

    keys: Tensor
    values: Tensor
    queries: Tensor
    targets: Tensor
    query_mask: Tensor
    num_pairs: int

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    def target_vectors(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """One-hot targets [B, Q, S]."""
        return torch.nn.functional.one_hot(self.targets, self.num_pairs).to(dtype)

    def to(self, device) -> "RetrievalBatch":
        return RetrievalBatch(self.keys.to(device), self.values.to(device), self.queries.to(device),
                              self.targets.to(device), self.query_mask.to(device), self.num_pairs)


# Rows longer than this are sorted by numpy first (torch's CPU argsort is as fast below).
# Measured on fresh uniform draws, [32, n], per call: n = 20 14 us (torch) and 15 (numpy with the
# tie check), n = 100 96 and 30, n = 300 380 and 117. Timing a sort by sorting the same rows
# over and over flatters torch's comparison sort (the branch predictor learns the rows).
NUMPY_SORT_MIN = 24


def random_permutations(batch_size: int, n: int, generator: torch.Generator) -> Tensor:
    """[B, n] rows of independent uniform random permutations of 0..n-1: the argsort of each
    row of torch.rand(B, n) (``argsort_rows``)."""
    return argsort_rows(torch.rand(batch_size, n, generator=generator))


def argsort_rows(draws: Tensor) -> Tensor:
    """draws.argsort(dim=1) for a [B, n] float CPU tensor, exactly (the data stream of every
    stored run), faster for long rows.

    A row of distinct draws has one sorting permutation, whatever sorts it; numpy's vectorised
    sort is 3-5x faster than torch's for rows longer than NUMPY_SORT_MIN. Rows where two draws
    tie (for uniform float32 draws about n^2 / 2^25 of them: 1% at n = 600) are sorted by torch,
    whose order for ties defines the stream."""
    if draws.shape[1] <= NUMPY_SORT_MIN:
        return draws.argsort(dim=1)
    values = draws.numpy()
    if values.dtype == np.float32 and values.size and values.min() >= 0:
        order, ranked = _packed_argsort(values)
    else:
        order = np.argsort(values, axis=1)
        ranked = np.sort(values, axis=1)              # a second sort is cheaper than a gather
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    permutations = torch.from_numpy(order).long()
    if tied.size:
        rows = torch.from_numpy(tied)
        permutations[rows] = draws[rows].argsort(dim=1)
    return permutations


def _packed_argsort(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argsort, the sorted values' bit patterns) of the rows of a non-negative float32 [B, n]
    array. Non-negative floats order as their bit patterns (-0.0's sign bit cleared: it equals
    0.0), so one uint64 per draw, bits << 32 | index, sorts both at once with numpy's vectorised
    integer sort: 128 -> 50 us at n = 600 against np.argsort (numpy 2.4, AVX-512), and no
    second sort for the tie check. Tied draws come out by index, which the caller replaces by
    torch's order anyway."""
    n = values.shape[1]
    bits = (values.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.uint64)
    packed = (bits << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    packed.sort(axis=1)
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.int64), packed >> np.uint64(32)


def last_occurrence(keys: Tensor, num_pairs: int) -> Tensor:
    """[B, S] position of each key id's last occurrence in its sequence, -1 where absent."""
    batch_size, length = keys.shape
    positions = torch.arange(length).expand(batch_size, length)
    last = torch.full((batch_size, num_pairs), -1, dtype=torch.long)
    return last.scatter_reduce(1, keys, positions, reduce="amax", include_self=True)


def value_of(keys: Tensor, values: Tensor, queries: Tensor, num_pairs: int) -> Tensor:
    """[B, Q] the value stored at each query key's last occurrence."""
    last = last_occurrence(keys, num_pairs).gather(1, queries)  # [B, Q]
    if (last < 0).any():
        raise ValueError("a query key does not occur in its sequence")
    return values.gather(1, last)


def _single_query(keys: Tensor, values: Tensor, num_pairs: int, generator: torch.Generator,
                  distinct: bool = False):
    """One query per sequence: the key at a uniformly random position. distinct: the keys of a
    sequence are distinct (capacity), so the queried position is the key's last occurrence."""
    batch_size, length = keys.shape
    # A uniformly random position, as the original code (np.random.choice over the sequence):
    # in the overwrite setting frequent keys are queried more often.
    position = torch.randint(0, length, (batch_size, 1), generator=generator)
    queries = keys.gather(1, position)
    targets = (values.gather(1, position) if distinct
               else value_of(keys, values, queries, num_pairs))
    mask = torch.ones_like(queries, dtype=torch.bool)
    return RetrievalBatch(keys, values, queries, targets, mask, num_pairs)


def capacity_batch(num_pairs: int, batch_size: int, generator: torch.Generator,
                   length: int | None = None) -> RetrievalBatch:
    """Setting 1: L (default S) distinct keys with distinct values, one random query each."""
    length = num_pairs if length is None else length
    if length > num_pairs:
        raise ValueError(f"the capacity setting needs L <= S distinct keys, got L={length}, S={num_pairs}")
    keys = random_permutations(batch_size, num_pairs, generator)[:, :length]
    values = random_permutations(batch_size, num_pairs, generator)[:, :length]
    return _single_query(keys, values, num_pairs, generator, distinct=True)


def overwrite_batch(num_pairs: int, batch_size: int, generator: torch.Generator,
                    length: int | None = None) -> RetrievalBatch:
    """Setting 2: L (default 2S) keys and values drawn with replacement; target = last value."""
    length = 2 * num_pairs if length is None else length
    keys = torch.randint(0, num_pairs, (batch_size, length), generator=generator)
    values = torch.randint(0, num_pairs, (batch_size, length), generator=generator)
    return _single_query(keys, values, num_pairs, generator)


def sample_batch(setting: str, num_pairs: int, batch_size: int, generator: torch.Generator,
                 length: int | None = None) -> RetrievalBatch:
    """A training batch of the named setting ("capacity" or "overwrite")."""
    if setting == "capacity":
        return capacity_batch(num_pairs, batch_size, generator, length)
    if setting == "overwrite":
        return overwrite_batch(num_pairs, batch_size, generator, length)
    raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
