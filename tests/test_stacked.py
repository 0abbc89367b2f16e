"""StackedRetrievalModel (models/stacked.py) against its members run one by one, in float64."""
import pytest
import torch

from models.retrieval import build_model
from models.stacked import StackedRetrievalModel
from tasks import sample_batch
from tasks.evaluation import evaluation_set

MEMBERS = 3


def members(S, feature_map, rule, **options):
    models = []
    for m in range(MEMBERS):
        torch.manual_seed(100 + m)
        models.append(build_model(S, feature_map, rule, **options).double())
    return models


@pytest.mark.parametrize("feature_map, rule, options, setting", [
    ("linear", "sum", {}, "capacity"),
    ("dpfp", "delta", {"feature_options": {"nu": 2}}, "overwrite"),
    ("tanh", "fwm", {}, "overwrite"),
    ("taylor", "sum", {"d_key": 8}, "capacity"),          # equal buffers: shared
    ("softmax", "sum", {}, "capacity"),
])
def test_stacked_equals_members_forward_and_backward(feature_map, rule, options, setting, native_steps,
                                                    generator):
    S = 9
    models = members(S, feature_map, rule, **options)
    stacked = StackedRetrievalModel(models)
    batches = [sample_batch(setting, S, 4, generator) for _ in range(MEMBERS)]
    ids = {name: torch.stack([getattr(b, name) for b in batches]) for name in ("keys", "values", "queries")}
    y = stacked(ids["keys"], ids["values"], ids["queries"])                     # [M, B, Q, S]
    weights = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    (y * weights).sum().backward()
    for m, (model, batch) in enumerate(zip(models, batches)):
        y_m = model(batch)
        torch.testing.assert_close(y[m], y_m, rtol=1e-12, atol=1e-12)
        (y_m * weights[m]).sum().backward()
        torch.testing.assert_close(stacked.embedding.grad[m], model.embedding.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stacked.W_K_weight.grad[m], model.W_K.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stacked.W_K_bias.grad[m], model.W_K.bias.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stacked.W_Q_weight.grad[m], model.W_Q.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stacked.W_Q_bias.grad[m], model.W_Q.bias.grad, rtol=1e-10, atol=1e-12)
        if model.W_b is not None:
            torch.testing.assert_close(stacked.W_b_weight.grad[m], model.W_b.weight.grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(stacked.W_b_bias.grad[m], model.W_b.bias.grad, rtol=1e-10, atol=1e-12)


def test_stacked_reads_every_query_of_an_evaluation_set(generator):
    S = 12
    models = members(S, "dpfp", "sum", feature_options={"nu": 1})
    stacked = StackedRetrievalModel(models).eval()
    sets = [evaluation_set("capacity", S, "paper", generator, 5) for _ in range(MEMBERS)]
    ids = {name: torch.stack([getattr(b, name) for b in sets]) for name in ("keys", "values", "queries")}
    with torch.no_grad():
        y = stacked(ids["keys"], ids["values"], ids["queries"])
        for m, (model, batch) in enumerate(zip(models, sets)):
            torch.testing.assert_close(y[m], model.eval()(batch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [{"m": 8, "redraw": "fixed"}, {"m": 8}])
@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_random_feature_maps_stay_per_member(options, rule, generator, monkeypatch):
    """FAVOR+ members keep their own Omega (fixed: drawn at construction; per call: drawn
    from each member's stream at every forward), in the kernel form (sum, training's one
    query; the members' kernels in one call, FAVORPlus.members_kernel, each member's rows read
    with its own Omega and projected tables), the features' (delta) and the memory
    (evaluation)."""
    import models.feature_maps as feature_maps
    calls = []
    real = feature_maps.favor_projected_kernel
    monkeypatch.setattr(feature_maps, "favor_projected_kernel",
                        lambda q, k, omega: calls.append(k.values.shape) or real(q, k, omega))
    S = 9
    models = members(S, "favor", rule, feature_options=options)
    for m, model in enumerate(models):
        model.redraw_generator = torch.Generator().manual_seed(7 + m)
    assert StackedRetrievalModel.supports(models)
    stacked = StackedRetrievalModel(models)
    own = [torch.Generator().manual_seed(7 + m) for m in range(MEMBERS)]
    for evaluating in (False, True):
        batches = ([evaluation_set("capacity", S, "paper", generator, 2) for _ in range(MEMBERS)]
                   if evaluating else [sample_batch("capacity", S, 4, generator) for _ in range(MEMBERS)])
        ids = {name: torch.stack([getattr(b, name) for b in batches]) for name in ("keys", "values", "queries")}
        stacked.train(not evaluating)
        stacked.redraw_features(own)
        y = stacked(ids["keys"], ids["values"], ids["queries"])
        for m, (model, batch) in enumerate(zip(models, batches)):
            y_m = model.train(not evaluating)(batch)        # redraws from the same stream
            torch.testing.assert_close(y[m], y_m, rtol=1e-12, atol=1e-12)
    omegas = [phi.omega for phi in stacked.memory.phi.members]
    assert not torch.equal(omegas[0], omegas[1])
    # training: the stacked model's members at once, then each model alone with its 4 sequences
    assert calls == ([torch.Size([4 * MEMBERS, S])] + [torch.Size([4, S])] * MEMBERS
                     if rule == "sum" else [])


@pytest.mark.parametrize("feature_map, options", [
    ("hedgehog", {}),                                                           # learnable map
])
def test_memories_with_per_member_state_are_not_stacked(feature_map, options):
    models = members(6, feature_map, "sum", **options)
    assert not StackedRetrievalModel.supports(models)
    with pytest.raises(ValueError, match="cannot share one memory"):
        StackedRetrievalModel(models)
