import pytest
import torch

from tasks import aggregate_eval_loss, evaluation_set, sample_batch
from tasks.associative import last_occurrence


@pytest.mark.parametrize("setting", ["capacity", "overwrite"])
def test_same_seed_same_batch(setting):
    a = sample_batch(setting, 30, 16, torch.Generator().manual_seed(7))
    b = sample_batch(setting, 30, 16, torch.Generator().manual_seed(7))
    c = sample_batch(setting, 30, 16, torch.Generator().manual_seed(8))
    for name in ("keys", "values", "queries", "targets"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.keys, c.keys)


def test_capacity_sequences_are_bijections(generator):
    S = 25
    batch = sample_batch("capacity", S, 64, generator)
    assert batch.keys.shape == (64, S)
    expected = torch.arange(S)
    for row_keys, row_values in zip(batch.keys, batch.values):
        assert torch.equal(row_keys.sort().values, expected)
        assert torch.equal(row_values.sort().values, expected)


@pytest.mark.parametrize("S", [6, 40])      # 6: many repeated keys in the overwrite setting
@pytest.mark.parametrize("setting", ["capacity", "overwrite"])
def test_targets_are_last_occurrence_values(setting, S, generator):
    batch = sample_batch(setting, S, 200, generator)
    assert batch.length == (S if setting == "capacity" else 2 * S)
    for b in range(batch.batch_size):
        keys, values = batch.keys[b].tolist(), batch.values[b].tolist()
        query = batch.queries[b, 0].item()
        last = max(t for t, k in enumerate(keys) if k == query)
        assert batch.targets[b, 0].item() == values[last]
    if setting == "overwrite":  # the task must actually contain overwrites
        assert any(len(set(row.tolist())) < batch.length for row in batch.keys)


def test_last_occurrence_marks_absent_keys():
    keys = torch.tensor([[0, 2, 0, 2]])
    assert last_occurrence(keys, 4).tolist() == [[2, -1, 3, -1]]


@pytest.mark.parametrize("protocol", ["paper", "clean"])
@pytest.mark.parametrize("setting", ["capacity", "overwrite"])
def test_evaluation_set_queries_every_distinct_key(setting, protocol, generator):
    S = 12
    batch = evaluation_set(setting, S, protocol, generator, num_sequences=20)
    assert batch.batch_size == 20
    expected_length = 2 * S if (setting == "overwrite" and protocol == "clean") else S
    assert batch.length == expected_length
    for b in range(20):
        keys, values = batch.keys[b].tolist(), batch.values[b].tolist()
        queried = batch.queries[b][batch.query_mask[b]].tolist()
        assert queried == sorted(set(keys))
        for i, q in enumerate(queried):
            last = max(t for t, k in enumerate(keys) if k == q)
            assert batch.targets[b, i].item() == values[last]


def test_paper_protocol_caps_queries_at_200(generator):
    batch = evaluation_set("capacity", 250, "paper", generator, num_sequences=3)
    assert batch.queries.shape[1] == 200
    assert torch.equal(batch.queries[0], torch.arange(200))
    clean = evaluation_set("capacity", 250, "clean", generator, num_sequences=3)
    assert clean.queries.shape[1] == 250


def test_paper_loss_is_mean_of_sub_batch_means():
    # one sequence with 5 queries and sub-batches of 2: chunks [1, 3], [5, 7], [9]
    losses = torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    paper = aggregate_eval_loss(losses, mask, "paper", sub_batch_size=2)
    clean = aggregate_eval_loss(losses, mask, "clean", sub_batch_size=2)
    assert paper.item() == pytest.approx((2.0 + 6.0 + 9.0) / 3)
    assert clean.item() == pytest.approx(5.0)


@pytest.mark.parametrize("n", [20, 25, 100, 201, 600])
def test_argsort_rows_is_torchs_argsort_exactly_ties_included(n):
    """The fast sort must not change a single stored data stream: rows of distinct draws, rows
    with a tie, rows of many ties."""
    from tasks.associative import argsort_rows
    g = torch.Generator().manual_seed(n)
    draws = torch.rand(24, n, generator=g)
    draws[3, 7] = draws[3, n - 1]                                # one tie
    draws[5] = (draws[5] * 40).floor()                           # many ties
    draws[8:12] = (draws[8:12] * 2 ** 12).floor() / 2 ** 12      # a few ties per row
    assert torch.equal(argsort_rows(draws), draws.argsort(dim=1))
    assert torch.equal(argsort_rows(draws[:, :0]), draws[:, :0].argsort(dim=1))
    assert torch.equal(argsort_rows(draws[:0]), draws[:0].argsort(dim=1))
    signed = draws.clone()
    signed[2, 4], signed[2, 9] = -0.0, 0.0                       # -0.0 ties with 0.0
    assert torch.equal(argsort_rows(signed), signed.argsort(dim=1))
    for other in (draws - 0.5, draws.double(), draws[:, ::2]):    # negative, float64, strided
        assert torch.equal(argsort_rows(other), other.argsort(dim=1))
