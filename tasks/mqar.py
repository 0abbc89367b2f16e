"""Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology", arXiv 2312.04927),
in Zoology's token layout, vectorised and seeded by an explicit torch.Generator.

A sequence of ``seq_len`` tokens: N key-value pairs k1 v1 k2 v2 ... (keys from [1, V/2), values
from [V/2, V), distinct within a sequence), then a query region in which every key reappears
once, at an even offset drawn without replacement from a power law p(g) ~ g^(power_a - 1)
(small gaps likelier for small power_a). The label at a query position is that key's value;
every other label is -100 (ignored). Positions of the query region that hold no query are filler.

Filler: Zoology fills them with tokens drawn from the whole vocabulary, which can repeat
context keys and values (a query-like token with no label; 38% of sequences at L=256, N=64).
Here the default is a separate noise vocabulary of ``noise_vocab_size`` ids V .. V+n-1 that
never collide with keys or values; ``filler="vocab"`` reproduces Zoology's in-vocabulary filler,
``filler="zero"`` leaves token 0 as in Zoology with random_non_queries=False.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FILLERS = ("noise", "vocab", "zero")
IGNORE = -100


@dataclass
class MQARBatch:
    """inputs [B, T] token ids; labels [B, T] value ids at query positions, -100 elsewhere."""

    inputs: Tensor
    labels: Tensor
    num_kv_pairs: Tensor      # [B] the slice each sequence belongs to
    vocab_size: int           # total ids, noise vocabulary included

    @property
    def query_mask(self) -> Tensor:
        return self.labels != IGNORE


def power_law_gaps(batch_size: int, space: int, num_queries: int, power_a: float,
                   generator: torch.Generator) -> Tensor:
    """[B, N] distinct slots in 0..space-1 drawn without replacement with p(g) ~ (g+1)^(a-1)."""
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    return torch.multinomial(p.expand(batch_size, space), num_queries, replacement=False,
                             generator=generator)


def total_vocab_size(vocab_size: int, filler: str = "noise", noise_vocab_size: int = 64) -> int:
    """Token ids in use: the vocabulary, plus the noise vocabulary when filler is "noise"."""
    return vocab_size + noise_vocab_size if filler == "noise" else vocab_size


def mqar_batch(batch_size: int, num_kv_pairs: int, generator: torch.Generator, vocab_size: int = 256,
               seq_len: int = 128, power_a: float = 0.01, filler: str = "noise",
               noise_vocab_size: int = 64) -> MQARBatch:
    """A batch of MQAR sequences (see the module docstring for the layout)."""
    N, T, V = num_kv_pairs, seq_len, vocab_size
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; choose from {', '.join(FILLERS)}")
    if T % 2:
        raise ValueError(f"seq_len must be even, got {T}")
    if N < 1 or 4 * N > T:
        raise ValueError(f"MQAR needs 1 <= num_kv_pairs <= seq_len / 4, got {N} pairs for seq_len {T}")
    if V // 2 - 1 < N:
        raise ValueError(f"vocab_size {V} has too few keys for {N} distinct pairs")
    key_ids = torch.rand(batch_size, V // 2 - 1, generator=generator).argsort(1)[:, :N] + 1
    value_ids = torch.rand(batch_size, V - V // 2, generator=generator).argsort(1)[:, :N] + V // 2
    context = torch.stack([key_ids, value_ids], dim=2).flatten(1)          # [B, 2N] k1 v1 k2 v2 ...

    space = (T - 2 * N) // 2
    gaps = power_law_gaps(batch_size, space, N, power_a, generator)       # [B, N]
    region = torch.zeros(batch_size, T - 2 * N, dtype=torch.long)
    region.scatter_(1, 2 * gaps, key_ids)
    inputs = torch.cat([context, region], dim=1)                          # [B, T]
    labels = torch.full((batch_size, T), IGNORE, dtype=torch.long)
    labels.scatter_(1, 2 * N + 2 * gaps, value_ids)

    empty = torch.zeros_like(inputs, dtype=torch.bool)
    empty[:, 2 * N:] = region == 0
    if filler == "noise":
        noise = V + torch.randint(0, noise_vocab_size, inputs.shape, generator=generator)
        inputs = torch.where(empty, noise, inputs)
    elif filler == "vocab":
        inputs = torch.where(empty, torch.randint(0, V, inputs.shape, generator=generator), inputs)
    return MQARBatch(inputs, labels, torch.full((batch_size,), N),
                     total_vocab_size(V, filler, noise_vocab_size))


def mqar_eval_set(num_kv_pairs: list[int], examples_per_slice: int, generator: torch.Generator,
                  **task_options) -> list[MQARBatch]:
    """One batch per slice (number of pairs), e.g. Zoology's test slices."""
    return [mqar_batch(examples_per_slice, n, generator, **task_options) for n in num_kv_pairs]
