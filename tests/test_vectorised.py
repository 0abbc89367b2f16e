"""Seeds trained together (training/vectorised.py) against separate sequential runs."""
import pytest
import torch

from training.config import ConfigError, RunConfig
from training.trainer import train
from training.vectorised import train_seeds


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("fields", [
    dict(feature_map="dpfp", feature_options={"nu": 1}, rule="sum"),
    dict(feature_map="favor", feature_options={"m": 16}, rule="sum"),    # per-member feature draws
    dict(feature_map="softmax", rule="sum"),
    dict(feature_map="linear", rule="fwl", setting="overwrite"),
    dict(feature_map="dpfp", feature_options={"nu": 1}, rule="delta", setting="overwrite"),
    dict(feature_map="tanh", rule="fwm", setting="overwrite"),
])
def test_vectorised_seeds_match_separate_runs(fields):
    base = RunConfig(num_pairs=10, max_steps=150, eval_every=50, **fields)
    configs = [base.replace(seed=s) for s in range(3)]
    together = train_seeds(configs)
    for config, result in zip(configs, together):
        alone = train(config, progress=False)
        assert result["run_id"] == alone["run_id"] and result["status"] == alone["status"]
        assert [s for s, _, _ in result["curve"]] == [s for s, _, _ in alone["curve"]]
        for (_, a, _), (_, b, _) in zip(result["curve"], alone["curve"]):
            # rounding differs (batched products), and training amplifies it a little
            assert a == pytest.approx(b, rel=1e-2, abs=1e-5)
        assert result["versions"]["engine"] == "vectorised x3"


def test_members_stop_independently():
    # Linear sum at S = 12 solves after about 1000 steps, a little sooner or later per seed.
    base = RunConfig(num_pairs=12, feature_map="linear", max_steps=3000, eval_every=20)
    results = train_seeds([base.replace(seed=s) for s in range(4)])
    steps = [r["steps"] for r in results]
    assert all(r["solved"] for r in results)
    assert len(set(steps)) > 1
    for config, result in zip([base.replace(seed=s) for s in range(4)], results):
        assert result["steps"] == train(config, progress=False)["steps"]


def test_configs_must_differ_only_in_seed():
    with pytest.raises(ConfigError, match="only in their seed"):
        train_seeds([RunConfig(num_pairs=6), RunConfig(num_pairs=8, seed=1)])


def test_a_group_whose_models_cannot_be_built_is_recorded_as_failed(monkeypatch):
    from training import trainer

    def out_of_memory(self):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(trainer.RetrievalTask, "build_model", out_of_memory)
    base = RunConfig(num_pairs=6, max_steps=10)
    results = train_seeds([base.replace(seed=s) for s in range(2)])
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all("out of memory" in r["error"] for r in results)
