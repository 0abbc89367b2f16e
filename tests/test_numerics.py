import math

import torch

from models.numerics import exp_floor, floored_exp, floored_softmax, tanh_via_sigmoid


def test_floored_exp_equals_exp_above_the_floor_and_is_tiny_below():
    assert exp_floor(torch.float32) == -87 and exp_floor(torch.float64) == -708
    for dtype, tiny in ((torch.float32, 1.2e-38), (torch.float64, 2.3e-308)):
        x = torch.linspace(-1000, 50, 4001, dtype=dtype)
        above = x >= exp_floor(dtype)
        assert torch.equal(floored_exp(x)[above], torch.exp(x)[above])
        below = floored_exp(x)[~above]
        assert (below >= torch.finfo(dtype).tiny).all() and (below < 1.4 * tiny * math.e).all()


def test_floored_softmax_matches_softmax_forward_and_backward():
    torch.manual_seed(0)
    x = (torch.randn(7, 300, dtype=torch.float64) * 300).requires_grad_()   # spreads past -708
    g = torch.randn(7, 300, dtype=torch.float64)
    ours = floored_softmax(x)
    ref = torch.softmax(x, dim=-1)
    assert (ref == 0).any() and (ours > 0).all()                     # the floor is reached
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-36)   # floored entries differ by < 2e-38
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-12, atol=1e-14)


def test_tanh_via_sigmoid_equals_tanh():
    x32 = torch.cat([torch.linspace(-30, 30, 20001), torch.logspace(-8, 1, 1000), -torch.logspace(-8, 1, 1000)])
    exact = torch.tanh(x32.double())
    assert (tanh_via_sigmoid(x32).double() - exact).abs().max().item() <= 2.5e-7   # torch.tanh: 3e-8
    x64 = x32.double().requires_grad_()
    torch.testing.assert_close(tanh_via_sigmoid(x64), torch.tanh(x64), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(tanh_via_sigmoid(x64).sum(), x64)
    torch.testing.assert_close(grad, 1 - torch.tanh(x64.detach()) ** 2, rtol=0, atol=1e-15)
