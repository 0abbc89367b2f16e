import pytest
import torch

from tasks.mqar import IGNORE, mqar_batch, power_law_gaps


def check_layout(batch, N, V):
    for inputs, labels in zip(batch.inputs.tolist(), batch.labels.tolist()):
        keys, values = inputs[0:2 * N:2], inputs[1:2 * N:2]
        assert len(set(keys)) == N and len(set(values)) == N
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        answer = dict(zip(keys, values))
        queried = [(t, inputs[t], labels[t]) for t in range(len(inputs)) if labels[t] != IGNORE]
        assert sorted(k for _, k, _ in queried) == sorted(keys)       # every key queried once
        for t, key, value in queried:
            assert t >= 2 * N and (t - 2 * N) % 2 == 0 and value == answer[key]


@pytest.mark.parametrize("filler", ["noise", "vocab", "zero"])
def test_layout_matches_zoology(filler, generator):
    N, V, T = 8, 128, 64
    batch = mqar_batch(50, N, generator, vocab_size=V, seq_len=T, filler=filler, noise_vocab_size=16)
    assert batch.inputs.shape == batch.labels.shape == (50, T)
    check_layout(batch, N, V)
    region = batch.inputs[:, 2 * N:][batch.labels[:, 2 * N:] == IGNORE]
    if filler == "noise":   # filler never collides with keys or values
        assert (region >= V).all() and batch.vocab_size == V + 16
    elif filler == "zero":
        assert (region == 0).all() and batch.vocab_size == V
    else:
        assert (region < V).all() and batch.vocab_size == V


def test_same_seed_same_batch():
    a = mqar_batch(4, 4, torch.Generator().manual_seed(3), vocab_size=64, seq_len=32)
    b = mqar_batch(4, 4, torch.Generator().manual_seed(3), vocab_size=64, seq_len=32)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


def test_power_law_favours_short_gaps(generator):
    gaps = power_law_gaps(4000, 50, 1, 0.01, generator).flatten()
    uniform = power_law_gaps(4000, 50, 1, 1.0, generator).flatten()
    assert (gaps < 5).float().mean() > 0.4 > (uniform < 5).float().mean()


def test_bad_knobs_raise(generator):
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar_batch(2, 20, generator, seq_len=64)
    with pytest.raises(ValueError, match="filler"):
        mqar_batch(2, 4, generator, filler="random")
