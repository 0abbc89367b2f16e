"""Evaluation sets: a few sequences, every distinct key of each queried.

Two protocols:

- ``paper``: exactly what the original code (ischlag/fast-weight-transformers,
  synthetic/main.py) measures, quirks included:
    * evaluation sequences have length S in BOTH settings (training in Setting 2 uses 2S);
    * at most 200 queries per sequence: the 200 smallest key ids present;
    * the reported loss is the mean of sub-batch means, where each sequence's queries are
      split in order into sub-batches of the training batch size (the last, smaller
      sub-batch weighs as much as a full one).
- ``clean``: sequences drawn from the training distribution (length 2S in Setting 2), every
  distinct key queried, and the loss is the plain mean over all queries.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tasks.associative import RetrievalBatch, last_occurrence, random_permutations

PROTOCOLS = ("paper", "clean")
PAPER_MAX_QUERIES = 200


def evaluation_set(setting: str, num_pairs: int, protocol: str, generator: torch.Generator,
                   num_sequences: int = 20) -> RetrievalBatch:
    """[num_sequences] sequences, each with all its distinct keys as queries (ragged: see mask).

    Queries are in ascending key-id order, as np.unique orders them in the original code.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    S, B = num_pairs, num_sequences
    if setting == "capacity":
        keys = random_permutations(B, S, generator)
        values = random_permutations(B, S, generator)
    elif setting == "overwrite":
        length = S if protocol == "paper" else 2 * S
        keys = torch.randint(0, S, (B, length), generator=generator)
        values = torch.randint(0, S, (B, length), generator=generator)
    else:
        raise ValueError(f"unknown setting {setting!r}")

    last = last_occurrence(keys, S)                                    # [B, S]
    present = last >= 0                                                # [B, S] by key id
    if protocol == "paper":
        present &= present.cumsum(dim=1) <= PAPER_MAX_QUERIES
    # Compact the present key ids to the front of each row (stable: ascending ids).
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
    num_queries = int(present.sum(dim=1).max())
    queries = order[:, :num_queries]                                   # [B, Q]
    mask = present.gather(1, queries)                                  # [B, Q]
    targets = values.gather(1, last.gather(1, queries).clamp(min=0))   # [B, Q]
    return RetrievalBatch(keys, values, queries, targets, mask, S)


def aggregate_eval_loss(query_losses: Tensor, mask: Tensor, protocol: str,
                        sub_batch_size: int) -> Tensor:
    """Reduce per-query losses [B, Q] (masked) to the protocol's scalar evaluation loss."""
    mask = mask.to(query_losses.dtype)
    if protocol == "clean":
        return (query_losses * mask).sum() / mask.sum()
    # paper: mean over all sub-batches (of every sequence) of each sub-batch's mean loss.
    num_queries = query_losses.shape[1]
    sub_batch = torch.arange(num_queries) // sub_batch_size              # [Q]
    num_sub = int(sub_batch[-1]) + 1
    sums = torch.zeros(query_losses.shape[0], num_sub, dtype=query_losses.dtype)
    counts = torch.zeros_like(sums)
    sums.index_add_(1, sub_batch, query_losses * mask)
    counts.index_add_(1, sub_batch, mask)
    real = counts > 0
    return (sums[real] / counts[real]).mean()
