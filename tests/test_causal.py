"""The token-stream (causal) form of every memory equals reading a memory built from each prefix."""
import pytest
import torch

from models.memory import FastWeightMemory, SoftmaxMemory
from models.feature_maps import build_feature_map
from models.rules import build_rule

RULES = [("sum", {}), ("sum", {"normaliser": False}), ("delta", {"chunk_size": 4}), ("fwm", {}),
         ("fwl", {"loss": "cross_entropy"})]


def memory_for(rule, options, d_key=5, d_value=4):
    if rule == "softmax":
        return SoftmaxMemory(d_key)
    phi = build_feature_map("linear", d_key)   # ELU+1: never an all-zero feature vector
    return FastWeightMemory(phi, build_rule(rule, phi.d_dot, d_value, **options)).double()


@pytest.mark.parametrize("rule,options", RULES + [("softmax", {})])
def test_causal_equals_prefix_reads(rule, options, generator):
    B, T, d_key, d_value = 2, 11, 5, 4
    memory = memory_for(rule, options)
    if rule == "fwl":
        with torch.no_grad():
            memory.rule.S0.normal_(generator=generator)
    k = torch.randn(B, T, d_key, generator=generator, dtype=torch.float64)
    q = torch.randn(B, T, d_key, generator=generator, dtype=torch.float64)
    v = torch.randn(B, T, d_value, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, T, generator=generator, dtype=torch.float64)
    o = memory.causal(k, v, beta, q)
    assert o.shape == (B, T, d_value)
    for t in range(T):
        # the fwl rule reads the memory of the STRICTLY earlier positions (the FWL's causality)
        end = t if rule == "fwl" else t + 1
        if end == 0:   # nothing written yet: the slow memory W_0 alone answers
            phi_q = memory.normalised(q[:, :1], memory.rule.query_norm, 1e-6)
            torch.testing.assert_close(o[:, :1], phi_q @ memory.rule.S0)
            continue
        prefix = memory(k[:, :end], v[:, :end], beta[:, :end], q[:, t:t + 1])
        torch.testing.assert_close(o[:, t:t + 1], prefix, rtol=1e-9, atol=1e-11)
