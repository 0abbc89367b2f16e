"""The FWL gradient rule in the retrieval suite: parallel form vs loop, and its relation to
the sum and delta rules."""
import pytest
import torch

from models.retrieval import build_model
from models.rules import delta_rule_chunkwise, fwl_rule_parallel, fwl_rule_recurrent, linear_attention_parallel
from tasks import sample_batch


def inputs(generator, B=2, L=13, D_k=6, D_v=4):
    k = torch.rand(B, L, D_k, generator=generator, dtype=torch.float64)
    k = (k / k.sum(-1, keepdim=True)).requires_grad_()
    q = torch.rand(B, L, D_k, generator=generator, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64).requires_grad_()
    S0 = torch.randn(D_k, D_v, generator=generator, dtype=torch.float64).requires_grad_()
    eta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    return q, k, v, S0, eta


@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_parallel_equals_recurrent(loss, generator):
    tensors = inputs(generator)
    o_rec, S_rec = fwl_rule_recurrent(*tensors, loss=loss)
    o_par, S_par = fwl_rule_parallel(*tensors, loss=loss)
    torch.testing.assert_close(o_par, o_rec, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S_par, S_rec, rtol=1e-10, atol=1e-12)
    g_rec = torch.autograd.grad((o_rec ** 2).sum() + S_rec.sum(), tensors)
    g_par = torch.autograd.grad((o_par ** 2).sum() + S_par.sum(), tensors)
    for a, b in zip(g_rec, g_par):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_zero_slow_memory_is_eta_times_sum_rule(generator):
    q, k, v, S0, eta = inputs(generator)
    _, S = fwl_rule_parallel(None, k, v, torch.zeros_like(S0), eta)
    _, (S_sum, _) = linear_attention_parallel(q, k, v, normalise=False)
    torch.testing.assert_close(S, eta * S_sum)


def test_first_order_agreement_with_delta_rule(generator):
    _, k, v, S0, _ = inputs(generator)
    gaps = []
    for eta in (1e-2, 1e-3):
        _, S_fwl = fwl_rule_parallel(None, k, v, torch.zeros_like(S0), torch.tensor(eta, dtype=torch.float64))
        _, S_delta = delta_rule_chunkwise(None, k, v, torch.full(k.shape[:2], eta, dtype=torch.float64))
        gaps.append((S_fwl - S_delta).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=0.05)     # the gap is O(eta^2)


def test_cannot_overwrite():
    k = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    S0 = torch.tensor([[0.2, 0.3], [0.0, 0.0]], dtype=torch.float64)
    _, S = fwl_rule_parallel(None, k, v, S0, torch.tensor(1.0, dtype=torch.float64))
    # reads back v1 + v2 - W_0 k (both writes' errors add up), where the delta rule gives v2
    assert (k[0, 0] @ S[0]).tolist() == pytest.approx([1.0 - 0.2, 1.0 - 0.3])


@pytest.mark.parametrize("feature_map,options", [("linear", {}), ("dpfp", {"nu": 1}), ("favor", {"m": 8})])
def test_composes_with_feature_maps_and_trains(feature_map, options, generator):
    model = build_model(10, feature_map, "fwl", feature_options=options,
                        rule_options={"loss": "cross_entropy"})
    batch = sample_batch("overwrite", 10, 8, generator)
    model.loss(batch).backward()
    assert model.memory.rule.eta.grad is not None and model.memory.rule.S0.grad.abs().sum() > 0
