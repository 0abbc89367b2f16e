"""Sequences in blocks whose fast-weight states fit a core's L2 cache.

A chunkwise rule touches every sequence's D_k x D_v state (and, in the backward, its gradient)
several times per chunk. Written for the whole batch at once, those states stream from memory
at every chunk; in blocks of sequences whose states together fill about STATE_BLOCK_BYTES they
stay in L2 through a chunk's products and passes. Measured on the 2-core CPU (1 MiB of L2 per
core), forward + backward:
- FWM write, B = 128, L = 400, D_k = 64, D_v = 200: 253 ms whole, 213 in blocks of 20;
- delta rule outputs form, B = 32, L = 1200, D_k = 384, D_v = 600: 2548 ms whole, 2320-2390 ms
  in blocks of 1 or 2; L = 400, D_v = 200: 350-386 ms whole, 320 ms in blocks of 4.
Sequences are independent, so blocks give the whole batch's floats, except that MKL may round a
product in the last bit differently for a block that starts off a 64-byte boundary. Through the
FWM's clip such a last-bit difference can grow: float32 gradients of a heavily clipped write
differ by up to 5e-4 relative on some draws (float64: equal; tests/test_fast_paths.py).
"""
from __future__ import annotations

import torch

STATE_BLOCK_BYTES = 1 << 20


def block_size(batch: int, state_bytes: int, device: torch.device) -> int:
    """Sequences per block for states of `state_bytes` each: blocks of nearly equal size
    (ragged sizes evened out), the whole batch when it fits or off the CPU (a GPU wants the
    whole batch in one launch)."""
    block = max(1, STATE_BLOCK_BYTES // max(1, state_bytes))
    if batch <= block or device.type != "cpu":
        return batch
    return -(-batch // -(-batch // block))


def in_blocks(fn, block: int, *tensors):
    """fn on blocks of `block` sequences of the batch-first tensors (None passes through as
    None), its results (a tensor or a tuple of tensors and Nones) concatenated over the batch."""
    count = -(-tensors[0].shape[0] // block)
    if count == 1:
        return fn(*tensors)
    parts = [x.split(block) if x is not None else [None] * count for x in tensors]
    results = [fn(*args) for args in zip(*parts)]
    if isinstance(results[0], tuple):
        return tuple(None if r[0] is None else torch.cat(r) for r in zip(*results))
    return torch.cat(results)
