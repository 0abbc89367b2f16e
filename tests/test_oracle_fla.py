"""The delta rule against an external oracle: flash-linear-attention's pure-PyTorch reference
(fla/ops/delta_rule/naive.py, loaded by path; its Triton kernels are not used). `make` installs
it without its GPU dependencies; where it is missing these tests are skipped.

fla works on [B, H, L, d] and scales q by d_k^-1/2; its recurrence computes in float32, its
chunkwise form in the input dtype (float64 here, for the gradients).
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench import load_fla_naive
from models.rules.delta import delta_rule_chunkwise, delta_rule_recurrent, delta_rule_write


fla = load_fla_naive()
pytestmark = pytest.mark.skipif(fla is None, reason="flash-linear-attention (fla-core) is not installed")


def inputs(B, L, D_k, D_v, dtype, generator):
    """Sum-normalised positive keys and queries, beta in (0, 1): the suite's delta rule."""
    q = F.elu(torch.randn(B, L, D_k, generator=generator, dtype=dtype)) + 1
    k = F.elu(torch.randn(B, L, D_k, generator=generator, dtype=dtype)) + 1
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
    v = torch.randn(B, L, D_v, generator=generator, dtype=dtype)
    beta = torch.rand(B, L, generator=generator, dtype=dtype)
    return q, k, v, beta


def fla_form(name, q, k, v, beta, **options):
    """fla's form on our layout; q pre-scaled by d_k^1/2 to undo its d_k^-1/2."""
    scale = q.shape[-1] ** 0.5
    o, S = getattr(fla, name)((q * scale)[:, None], k[:, None], v[:, None], beta[:, None], **options)
    return o[:, 0], S[:, 0]


@pytest.mark.parametrize("L,chunk", [(24, 8), (40, 16), (7, 64)])
def test_outputs_and_state_equal_fla_recurrence(L, chunk, generator):
    q, k, v, beta = inputs(2, L, 6, 5, torch.float32, generator)
    o_fla, S_fla = fla_form("delta_rule_recurrence", q, k, v, beta)
    for o, S in (delta_rule_recurrent(q, k, v, beta), delta_rule_chunkwise(q, k, v, beta, chunk)):
        torch.testing.assert_close(o, o_fla, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(S, S_fla, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta_rule_write(k, v, beta, chunk), S_fla, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,chunk", [(32, 8), (48, 16)])
def test_gradients_equal_fla_chunkwise(L, chunk, generator):
    """float64 values and gradients of sum(o w_o) + sum(S w_S) against fla's chunkwise form
    (fla needs L divisible by its chunk), and of the training write (final state only)."""
    leaves = [x.requires_grad_() for x in inputs(2, L, 6, 5, torch.float64, generator)]
    w_o = torch.randn(2, L, 5, generator=generator, dtype=torch.float64)
    w_S = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64)

    def grads(o, S):
        total = (S * w_S).sum() + ((o * w_o).sum() if o is not None else 0)
        return torch.autograd.grad(total, leaves, allow_unused=True)

    o_fla, S_fla = fla_form("delta_rule_chunkwise", *leaves, chunk_size=chunk)
    o, S = delta_rule_chunkwise(*leaves, chunk)
    torch.testing.assert_close(o, o_fla, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads(o, S), grads(o_fla, S_fla)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)

    q, k, v, beta = leaves
    _, S_fla = fla_form("delta_rule_chunkwise", q, k, v, beta, chunk_size=chunk)
    ours = torch.autograd.grad((delta_rule_write(k, v, beta, chunk) * w_S).sum(), (k, v, beta))
    theirs = torch.autograd.grad((S_fla * w_S).sum(), (k, v, beta))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
