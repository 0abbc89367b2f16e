"""Tests for models/fwl.py (Fast Weight Layers, arXiv 2212.02475).

The central check is against brute force: for every position t, take the slow parameters, do
one explicit SGD step with torch.autograd on the weighted inner loss of positions s < t, and run
the plain slow forward at t with the stepped parameters. The block (hand-derived errors + causal
linear attention) must match it in float64, forward and meta-gradients.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.fwl import (
    FWLBlock,
    causal_linear_attention,
    causal_linear_attention_reference,
    fwl_labels_and_weights,
)

PARAM_NAMES = ("K1", "b1", "K2", "b2", "alpha", "beta_ln", "U", "c")

# Written out independently of models.fwl.FAST_UPDATES: parameter -> name of its step size.
# Parameters not listed (U, c always; b1, b2 under "jax") must never be fast-updated.
EXPECTED_FAST_UPDATES = {
    "tf": {"K1": "K1", "b1": "b1", "K2": "K2", "b2": "b2", "alpha": "alpha", "beta_ln": "beta_ln"},
    "jax": {"K1": "dense1", "K2": "dense2", "alpha": "layernorm", "beta_ln": "layernorm"},
}

# Non-trivial step sizes (not the 0.01 init), large enough that the fast update visibly moves
# the logits even though the inner loss is divided by the weight sum.
TEST_STEP_SIZES = {
    "tf": {"K1": 0.7, "b1": 0.3, "K2": 0.9, "b2": 0.4, "alpha": 1.1, "beta_ln": 0.6},
    "jax": {"dense1": 0.8, "dense2": 1.2, "layernorm": 0.9},
}

B, T, D, S, V, CHUNKS = 2, 8, 5, 3, 7, 4  # D != S on purpose; T / CHUNKS = 2 per chunk


# ----------------------------------------------------------------------------------------------
# Brute force: explicit SGD steps with autograd, then the slow forward at position t.
# ----------------------------------------------------------------------------------------------


def slow_forward(p: dict[str, torch.Tensor], x: torch.Tensor, ln_eps: float) -> torch.Tensor:
    """Plain FWL forward with parameters p: x [..., D] -> logits [..., V] (F.layer_norm, not ours)."""
    h = F.relu(x @ p["K1"] + p["b1"]).square()
    z2 = h @ p["K2"] + p["b2"]
    y = F.layer_norm(z2, z2.shape[-1:], weight=p["alpha"], bias=p["beta_ln"], eps=ln_eps)
    return y @ p["U"] + p["c"]


def brute_force_logits(block: FWLBlock, x, labels, weights) -> torch.Tensor:
    """logits[b, t] = slow_forward(theta - eta * grad_theta L_{b,<t}, x[b, t]), one autograd step each."""
    p = {name: getattr(block, name) for name in PARAM_NAMES}
    step = {param: block.step_sizes[name] for param, name in EXPECTED_FAST_UPDATES[block.semantics].items()}
    if block.normalisation == "batch":
        norm = weights.sum().clamp_min(1e-8).expand(weights.shape[0])
    else:
        norm = weights.sum(dim=1).clamp_min(1e-8)
    out = []
    for b in range(x.shape[0]):
        rows = []
        for t in range(x.shape[1]):
            stepped = dict(p)
            if t > 0:  # position 0 sees no earlier positions: slow parameters
                log_p = slow_forward(p, x[b, :t], block.ln_eps).log_softmax(dim=-1)
                inner = (weights[b, :t] * -(labels[b, :t] * log_p).sum(-1)).sum() / norm[b]
                names = list(step)
                # create_graph: the outer loss must flow through these inner gradients.
                grads = torch.autograd.grad(inner, [p[n] for n in names], create_graph=True)
                for name, g in zip(names, grads):
                    stepped[name] = p[name] - step[name] * g
            rows.append(slow_forward(stepped, x[b, t], block.ln_eps))
        out.append(torch.stack(rows))
    return torch.stack(out)  # [B, T, V]


def make_block(semantics: str, normalisation: str, seed: int = 0, **kwargs) -> FWLBlock:
    torch.manual_seed(seed)
    kwargs = {"size": S, "vocab_size": V, "attn_chunks": CHUNKS, "d_input": D} | kwargs
    block = FWLBlock(semantics=semantics, normalisation=normalisation, **kwargs).double()
    with torch.no_grad():
        for name, value in TEST_STEP_SIZES[semantics].items():
            block.step_sizes[name].fill_(value)
        # Non-trivial biases and LayerNorm parameters so every term of the update is exercised.
        for name in ("b1", "b2", "beta_ln", "c"):
            getattr(block, name).normal_(0.0, 0.3)
        block.alpha.add_(0.3 * torch.randn_like(block.alpha))
    return block


def make_inputs(seed: int = 1, batch: int = B, length: int = T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, D, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (batch, length), generator=g)
    labels = F.one_hot(tokens, V).double()
    weights = torch.ones(batch, length, dtype=torch.float64)
    weights[:, -1] = 0.0
    weights[0, 2] = 0.0  # a zero weight in the middle of a sequence
    if batch > 1:
        weights[1, 4:6] = 0.0  # different weight sums per sequence: "batch" != "sequence"
    return x, labels, weights


SETTINGS = [(sem, norm) for sem in ("tf", "jax") for norm in ("batch", "sequence")]


# ----------------------------------------------------------------------------------------------
# Forward and meta-gradients against brute force.
# ----------------------------------------------------------------------------------------------


def test_step_size_names_follow_semantics():
    for semantics, mapping in EXPECTED_FAST_UPDATES.items():
        block = FWLBlock(S, V, CHUNKS, semantics=semantics)
        assert set(block.step_sizes.keys()) == set(mapping.values())
        assert all(s.item() == pytest.approx(0.01) and s.dim() == 0 for s in block.step_sizes.values())
        assert {k: id(v) for k, v in block.fast_step_sizes().items()} == {
            k: id(block.step_sizes[n]) for k, n in mapping.items()
        }


@pytest.mark.parametrize("semantics,normalisation", SETTINGS)
def test_matches_brute_force_sgd_step(semantics, normalisation):
    block = make_block(semantics, normalisation)
    x, labels, weights = make_inputs()
    logits = block(x, labels, weights)
    expected = brute_force_logits(block, x, labels, weights)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    # The fast update must be large enough that this comparison means something.
    slow = slow_forward({n: getattr(block, n) for n in PARAM_NAMES}, x, block.ln_eps)
    assert (logits - slow)[:, 1:].abs().amax() > 1e-2
    torch.testing.assert_close(logits[:, 0], slow[:, 0], rtol=0, atol=1e-12)  # nothing before t=0


@pytest.mark.parametrize("semantics,normalisation", SETTINGS)
def test_meta_gradients_match_brute_force(semantics, normalisation):
    block = make_block(semantics, normalisation, seed=2)
    x, labels, weights = make_inputs(seed=3)
    x.requires_grad_(True)
    cotangent = torch.randn(B, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    wrt = [*block.parameters(), x]

    grads = torch.autograd.grad((block(x, labels, weights) * cotangent).sum(), wrt)
    expected = torch.autograd.grad((brute_force_logits(block, x, labels, weights) * cotangent).sum(), wrt)

    names = [n for n, _ in block.named_parameters()] + ["x"]
    for name, g, e in zip(names, grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad of {name}: {m}")
    # Step sizes receive a real meta-gradient (second order: no stop-gradient on the inner step).
    step_grads = [g for n, g in zip(names, grads) if n.startswith("step_sizes.")]
    assert len(step_grads) == len(set(EXPECTED_FAST_UPDATES[semantics].values()))
    assert all(g.abs() > 1e-6 for g in step_grads)


# ----------------------------------------------------------------------------------------------
# Mixed chunk attention.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("chunks", [1, 2, 3, 12])
def test_mixed_chunk_attention_equals_reference(chunks, strict):
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = causal_linear_attention(q, k, v, chunks, strict=strict)
    ref = causal_linear_attention_reference(q, k, v, strict=strict)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    # Against an explicit sum as well, so the reference itself is checked.
    mask = torch.ones(12, 12, dtype=torch.bool).tril(diagonal=-1 if strict else 0)
    explicit = ((q @ k.transpose(1, 2)) * mask) @ v
    torch.testing.assert_close(ref, explicit, rtol=1e-12, atol=1e-12)
    if strict:
        assert out[:, 0].abs().max() == 0  # nothing precedes position 0

    cot = torch.randn_like(out)
    g_out = torch.autograd.grad((out * cot).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * cot).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_indivisible_length_raises():
    block = FWLBlock(S, V, attn_chunks=4, d_input=D)
    x = torch.randn(1, 10, D)
    labels, weights = fwl_labels_and_weights(torch.randint(0, V, (1, 10)), vocab_size=V)
    with pytest.raises(ValueError, match="not divisible by attn_chunks=4"):
        block(x, labels, weights)
    with pytest.raises(ValueError, match="not divisible"):
        causal_linear_attention(x, x, x, chunks=3)


# ----------------------------------------------------------------------------------------------
# Causality and batch (in)variance.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", ["tf", "jax"])
@pytest.mark.parametrize("t", [0, 3, 5])
def test_label_at_t_only_affects_later_positions(semantics, t):
    block = make_block(semantics, "sequence")
    x, labels, weights = make_inputs()
    weights[:, t] = 1.0
    changed = labels.clone()
    changed[:, t] = changed[:, t].roll(1, dims=-1)  # a different one-hot target at position t
    with torch.no_grad():
        before, after = block(x, labels, weights), block(x, changed, weights)
    diff = (after - before).abs().amax(dim=-1)  # [B, T]
    assert diff[:, : t + 1].max() <= 1e-12, "label at t leaked into positions <= t"
    assert diff[:, t + 1 :].min() > 1e-6, "label at t did not reach every later position"


@pytest.mark.parametrize("semantics", ["tf", "jax"])
def test_input_at_t_only_affects_positions_from_t(semantics):
    block = make_block(semantics, "sequence")
    x, labels, weights = make_inputs()
    t = 4
    weights[:, t] = 1.0  # with weight 0, x_t would only reach position t itself
    changed = x.clone()
    changed[:, t] += 0.5
    with torch.no_grad():
        diff = (block(changed, labels, weights) - block(x, labels, weights)).abs().amax(dim=-1)
    assert diff[:, :t].max() <= 1e-12
    assert diff[:, t:].min() > 1e-6


@pytest.mark.parametrize("normalisation", ["sequence", "batch"])
def test_sequence_normalisation_is_batch_invariant(normalisation):
    block = make_block("tf", normalisation)
    x, labels, weights = make_inputs(batch=3)
    with torch.no_grad():
        in_batch = block(x, labels, weights)[:1]
        alone = block(x[:1], labels[:1], weights[:1])
    gap = (in_batch - alone).abs().max()
    if normalisation == "sequence":
        assert gap <= 1e-12
    else:  # the official batch-wide normaliser couples sequences: this must NOT be invariant
        assert gap > 1e-4


# ----------------------------------------------------------------------------------------------
# Labels and weights helper.
# ----------------------------------------------------------------------------------------------


def test_labels_and_weights_helper():
    pad = 0
    tokens = torch.tensor([[5, 6, 7, 8, 9, 4], [3, 2, 1, pad, pad, pad], [pad, pad, 4, 5, 6, 7]])
    labels, weights = fwl_labels_and_weights(tokens, pad_id=pad, vocab_size=10)
    assert labels.shape == (3, 6, 10)
    assert torch.equal(labels.argmax(-1)[:, :-1], tokens[:, 1:])  # label at t = token t+1
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],  # last position: its label would wrap around
            [1, 1, 0, 0, 0, 0],  # next token is padding from t=2 on
            [0, 0, 1, 1, 1, 0],  # current token is padding (left padding)
        ],
        dtype=torch.float32,
    )
    assert torch.equal(weights, expected)
    _, no_pad = fwl_labels_and_weights(tokens, vocab_size=10)
    assert torch.equal(no_pad[:, :-1], torch.ones(3, 5)) and no_pad[:, -1].sum() == 0


# ----------------------------------------------------------------------------------------------
# Training smoke test: fast weights solve in-context copying that slow weights cannot.
# ----------------------------------------------------------------------------------------------


def _train_copy_task(learn_fast_weights: bool, steps: int = 40) -> float:
    """Embedding + FWLBlock on sequences that repeat a random 8-token pattern 4 times.

    The pattern is new in every sequence, so the next token is only predictable from earlier in
    the same sequence: exactly what the fast weights store. Returns the mean loss of the last 5
    steps.
    """
    vocab, period, length, batch, width = 16, 8, 32, 16, 32
    torch.manual_seed(0)
    emb, block = nn.Embedding(vocab, width), FWLBlock(width, vocab, attn_chunks=4)
    if not learn_fast_weights:  # control: step sizes pinned to 0, i.e. a plain slow block
        for step_size in block.step_sizes.values():
            step_size.data.zero_()
            step_size.requires_grad_(False)
    params = [p for p in [*emb.parameters(), *block.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        pattern = torch.rand(batch, vocab, generator=g).argsort(dim=1)[:, :period]  # distinct tokens
        tokens = pattern.repeat(1, length // period)  # [batch, length]
        labels, weights = fwl_labels_and_weights(tokens, vocab_size=vocab)
        logits = block(emb(tokens), labels, weights)
        loss = (F.cross_entropy(logits.transpose(1, 2), labels.argmax(-1), reduction="none") * weights).sum()
        loss = loss / weights.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-5:]) / 5


def test_training_smoke_fast_weights_learn_copying():
    chance = math.log(16)
    fast = _train_copy_task(learn_fast_weights=True)
    slow = _train_copy_task(learn_fast_weights=False)
    assert fast < 0.5 * chance, f"loss {fast:.3f} did not fall well below chance {chance:.3f}"
    assert slow > 0.9 * math.log(15), f"slow-only control {slow:.3f} should stay near chance"


# ----------------------------------------------------------------------------------------------
# The README's "Fast Weight Layers" example runs as written.
# ----------------------------------------------------------------------------------------------


def test_readme_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text() if readme.exists() else ""
    section = re.search(r"^## Fast Weight Layers\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if section is None:
        pytest.skip("README.md has no '## Fast Weight Layers' section")
    code = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert code is not None, "the README section must contain a ```python example"
    exec(compile(code.group(1), "README.md", "exec"), {})
