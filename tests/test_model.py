import pytest
import torch
import torch.nn.functional as F

from models.retrieval import build_model, embedding_size
from tasks import sample_batch

COMBINATIONS = [("softmax", "sum", {}), ("linear", "sum", {}), ("linear", "delta", {}),
                ("dpfp", "delta", {"nu": 2}), ("favor", "sum", {"m": 16}), ("tanh", "fwm", {}),
                ("dpfp", "fwm", {"nu": 1}), ("identity", "sum", {})]


def test_embedding_size_matches_original_code():
    assert embedding_size(20) == 44
    assert embedding_size(600) == int(1200 * 1.1)


def test_lookup_projection_equals_concatenated_input(generator):
    torch.manual_seed(0)
    model = build_model(10, "linear", "delta").double()
    batch = sample_batch("overwrite", 10, 4, generator)
    x = torch.cat([F.one_hot(batch.values, 10).double(), model.embedding(batch.keys)], dim=-1)
    torch.testing.assert_close(model._project(model.W_K, batch.keys, batch.values), model.W_K(x))
    torch.testing.assert_close(model._project(model.W_b, batch.keys, batch.values), model.W_b(x))


@pytest.mark.parametrize("feature_map,rule,options", COMBINATIONS)
def test_every_parameter_receives_a_gradient(feature_map, rule, options, generator):
    torch.manual_seed(0)
    model = build_model(12, feature_map, rule, feature_options=options)
    batch = sample_batch("overwrite", 12, 8, generator)
    model.loss(batch).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("feature_map,rule,options", COMBINATIONS)
def test_output_shape_and_zero_output_loss(feature_map, rule, options, generator):
    model = build_model(12, feature_map, rule, feature_options=options)
    batch = sample_batch("capacity", 12, 5, generator)
    assert model(batch).shape == (5, 1, 12)
    # A zero output scores exactly 0.5 (the paper's plateau).
    target = batch.target_vectors()
    assert (0.5 * target.pow(2).sum(-1)).mean().item() == 0.5


def test_model_reads_one_memory_for_many_queries(generator):
    """Querying Q keys at once equals Q separate single-query forwards."""
    torch.manual_seed(0)
    model = build_model(9, "dpfp", "delta", feature_options={"nu": 1}).double()
    batch = sample_batch("capacity", 9, 3, generator)
    many = batch.__class__(batch.keys, batch.values, batch.keys, batch.values,
                           torch.ones_like(batch.keys, dtype=torch.bool), 9)
    y_many = model(many)
    for i in range(9):
        one = batch.__class__(batch.keys, batch.values, batch.keys[:, i:i + 1],
                              batch.values[:, i:i + 1], torch.ones(3, 1, dtype=torch.bool), 9)
        torch.testing.assert_close(model(one)[:, 0], y_many[:, i])


def test_state_size_counts():
    assert build_model(20, "dpfp", "sum", feature_options={"nu": 3}).state_size() == 384 * 20
    assert build_model(50, "linear", "delta").state_size() == 64 * 50
    assert build_model(30, "softmax", "sum").state_size() == 30 * (64 + 30)


def test_softmax_needs_sum_rule():
    with pytest.raises(ValueError, match="softmax"):
        build_model(10, "softmax", "delta")
