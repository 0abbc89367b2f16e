"""Every fast form against a plain reference, forward and backward."""
import pytest
import torch

from models.rules.delta import delta_rule_chunkwise_autograd
from models.rules import (delta_rule_chunkwise, delta_rule_recurrent, fwm_recurrent, fwm_write,
                          linear_attention_parallel, linear_attention_recurrent)


def delta_rule_float64_loop(q, k, v, beta):
    """The paper's notation, one position at a time, W [D_v, D_k] (independent of the suite)."""
    q, k, v, beta = (x.double() for x in (q, k, v, beta))
    B, L, D_k = k.shape
    outputs = torch.zeros(B, L, v.shape[2], dtype=torch.float64)
    W = [torch.zeros(v.shape[2], D_k, dtype=torch.float64) for _ in range(B)]
    for b in range(B):
        for t in range(L):
            v_bar = W[b] @ k[b, t]
            W[b] = W[b] + beta[b, t] * torch.outer(v[b, t] - v_bar, k[b, t])
            outputs[b, t] = W[b] @ q[b, t]
    return outputs, torch.stack([w.T for w in W])


def inputs(B, L, D_k, D_v, generator, dtype=torch.float64, beta_range=(0.0, 1.0)):
    phi = lambda x: torch.nn.functional.elu(x) + 1
    k = phi(torch.randn(B, L, D_k, generator=generator, dtype=dtype))
    k = k / k.sum(-1, keepdim=True)
    q = phi(torch.randn(B, L, D_k, generator=generator, dtype=dtype))
    v = torch.randn(B, L, D_v, generator=generator, dtype=dtype)
    low, high = beta_range
    beta = low + (high - low) * torch.rand(B, L, generator=generator, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, beta)]


def grads(fn, tensors):
    out, state = fn(*tensors)
    weights = [torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype),
               torch.randn(state.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)]
    loss = (out * weights[0]).sum() + (state * weights[1]).sum()
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("normalise", [True, False])
def test_sum_rule_recurrent_equals_parallel(normalise, generator):
    q, k, v, _ = inputs(3, 17, 6, 5, generator)
    o_rec, (S_rec, z_rec) = linear_attention_recurrent(q, k, v, normalise)
    o_par, (S_par, z_par) = linear_attention_parallel(q, k, v, normalise)
    torch.testing.assert_close(o_rec, o_par, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S_rec, S_par, rtol=1e-10, atol=1e-12)
    g_rec = torch.autograd.grad((o_rec ** 2).sum(), (q, k, v))
    g_par = torch.autograd.grad((o_par ** 2).sum(), (q, k, v))
    for a, b in zip(g_rec, g_par):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("L,chunk", [(37, 8), (40, 64), (64, 16), (5, 1)])
@pytest.mark.parametrize("beta_range", [(0.0, 1.0), (0.0, 1e-3), (1 - 1e-3, 1.0)])
def test_delta_chunkwise_equals_recurrent_equals_loop(L, chunk, beta_range, generator):
    tensors = inputs(2, L, 7, 5, generator, beta_range=beta_range)   # D_k != D_v
    o_loop, S_loop = delta_rule_float64_loop(*tensors)
    o_rec, S_rec = delta_rule_recurrent(*tensors)
    o_chunk, S_chunk = delta_rule_chunkwise(*tensors, chunk_size=chunk)
    for o, S in ((o_rec, S_rec), (o_chunk, S_chunk)):
        torch.testing.assert_close(o, o_loop, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(S, S_loop, rtol=1e-9, atol=1e-11)
    g_loop = grads(delta_rule_float64_loop, tensors)
    g_rec = grads(delta_rule_recurrent, tensors)
    g_chunk = grads(lambda *x: delta_rule_chunkwise(*x, chunk_size=chunk), tensors)
    for a, b, c in zip(g_loop, g_rec, g_chunk):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(c, a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("L,chunk", [(37, 8), (40, 64), (64, 16), (3, 1)])
def test_delta_chunkwise_hand_written_backward_equals_loop_and_autograd(L, chunk, generator):
    """DeltaRuleChunkwise (what a gradient runs through) from an initial state: outputs, final
    state and every gradient, the initial state's included, against the float64 loop continued
    from that state, and against autograd through the same chunks."""
    q, k, v, beta = inputs(2, L, 7, 5, generator)
    S_init = (0.3 * torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    leaves = (q, k, v, beta, S_init)
    o, S = delta_rule_chunkwise(q, k, v, beta, chunk, initial_state=S_init)
    assert type(o.grad_fn).__name__ == "DeltaRuleChunkwiseBackward"
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, initial_state=S_init)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)
    w_o = torch.randn(o.shape, generator=generator, dtype=o.dtype)
    w_S = torch.randn(S.shape, generator=generator, dtype=S.dtype)
    for uses in ((1, 1), (1, 0), (0, 1)):                  # unused outputs get zero gradients
        loss = lambda o, S: uses[0] * (o * w_o).sum() + uses[1] * (S * w_S).sum()
        ours = torch.autograd.grad(loss(*delta_rule_chunkwise(q, k, v, beta, chunk, S_init)), leaves)
        ref = torch.autograd.grad(loss(*delta_rule_recurrent(q, k, v, beta, S_init)), leaves)
        auto = torch.autograd.grad(loss(*delta_rule_chunkwise_autograd(q, k, v, beta, chunk, S_init)),
                                   leaves)
        for a, b, c in zip(ours, ref, auto):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_delta_chunkwise_without_gradient_runs_the_autograd_form(generator):
    q, k, v, beta = (x.detach() for x in inputs(2, 9, 4, 3, generator))
    o, S = delta_rule_chunkwise(q, k, v, beta, 4)
    assert o.grad_fn is None
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)


def test_delta_chunkwise_float32_close_to_float64(generator):
    tensors64 = [x.detach() for x in inputs(4, 100, 32, 20, generator)]
    tensors32 = [x.float() for x in tensors64]
    _, S64 = delta_rule_chunkwise(*tensors64, chunk_size=32)
    _, S32 = delta_rule_chunkwise(*tensors32, chunk_size=32)
    torch.testing.assert_close(S32.double(), S64, rtol=1e-4, atol=1e-5)


def test_delta_rule_two_steps_by_hand():
    # D_k = 2, D_v = 1. Step 1: k = (1, 0), v = 2, beta = 0.5 -> u = 0.5 * (2 - 0) = 1, S = [[1], [0]].
    # Step 2: k = (0.5, 0.5), v = 3, beta = 1 -> S^T k = 0.5, u = 3 - 0.5 = 2.5,
    #         S = [[1 + 1.25], [1.25]] = [[2.25], [1.25]]; o_2 = S^T q with q = (1, 0) -> 2.25.
    k = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    v = torch.tensor([[[2.0], [3.0]]])
    beta = torch.tensor([[0.5, 1.0]])
    q = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    for fn in (delta_rule_recurrent, lambda *a: delta_rule_chunkwise(*a, chunk_size=2)):
        o, S = fn(q, k, v, beta)
        assert S.flatten().tolist() == pytest.approx([2.25, 1.25])
        assert o.flatten().tolist() == pytest.approx([0.0, 2.25])


def test_delta_rule_overwrites():
    k = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    _, S = delta_rule_chunkwise(None, k, v, torch.ones(1, 2))
    assert (k[0, 0] @ S[0]).tolist() == [0.0, 1.0]      # the second value replaced the first


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_fwm_write_equals_recurrent(scale, generator):
    B, L, D_k, D_v = 3, 30, 6, 5
    k = (scale * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))).requires_grad_()
    v = torch.nn.functional.one_hot(torch.randint(0, D_v, (B, L), generator=generator), D_v).double()
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64).requires_grad_()
    _, S_ref = fwm_recurrent(None, k, v, beta)
    S_fast = fwm_write(k, v, beta)
    torch.testing.assert_close(S_fast, S_ref, rtol=1e-9, atol=1e-12)
    w = torch.randn(S_ref.shape, generator=generator, dtype=torch.float64)
    g_ref = torch.autograd.grad((S_ref * w).sum(), (k, beta))
    g_fast = torch.autograd.grad((S_fast * w).sum(), (k, beta))
    for a, b in zip(g_ref, g_fast):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    if scale > 1:  # the clip must have been active for the test to mean anything
        assert S_ref.flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)
