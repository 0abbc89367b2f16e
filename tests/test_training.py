import pytest

from training.config import ConfigError, RunConfig
from training.trainer import train


def dpfp1(**fields):
    return RunConfig(feature_map="dpfp", feature_options={"nu": 1}, **fields)


def test_dpfp1_sum_solves_capacity_s20():
    result = train(dpfp1(setting="capacity", num_pairs=20, rule="sum"), progress=False)
    assert result["status"] == "done" and result["solved"]
    assert result["best_eval_loss"] <= 1e-3
    assert result["curve"][-1][0] == result["steps"]


def test_delta_beats_sum_on_overwrite_s20():
    common = dict(setting="overwrite", num_pairs=20, max_steps=1000)
    delta = train(dpfp1(rule="delta", **common), progress=False)
    summed = train(dpfp1(rule="sum", **common), progress=False)
    assert delta["best_eval_loss"] < summed["best_eval_loss"]
    assert delta["best_eval_loss"] < 0.05 < summed["best_eval_loss"]


@pytest.fixture
def one_thread():
    # Bitwise reproducibility holds per thread count: parallel reductions round differently.
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_same_seed_same_numbers(one_thread):
    config = RunConfig(setting="overwrite", num_pairs=10, feature_map="favor",
                       feature_options={"m": 16}, rule="delta", max_steps=300)
    a, b = train(config, progress=False), train(config, progress=False)
    c = train(config.replace(seed=1), progress=False)
    assert a["curve"] == b["curve"]
    assert a["curve"] != c["curve"]


def test_stops_after_patience_without_improvement():
    # lr 0: nothing improves after the first evaluation.
    result = train(RunConfig(num_pairs=10, lr=1e-12, eval_every=5, patience=3, max_steps=1000),
                   progress=False)
    assert not result["solved"]
    assert result["steps"] <= 5 * (1 + 3 + 5)    # first eval, 3 strikes, small noise margin


def test_divergence_is_recorded_not_raised():
    result = train(RunConfig(num_pairs=10, feature_map="identity", rule="sum", lr=1e9,
                             eval_every=10, max_steps=200,
                             rule_options={"normaliser": False}), progress=False)
    assert result["status"] == "diverged"
    assert result["steps"] < 200


@pytest.mark.parametrize("fields,message", [
    ({"num_pairs": 1}, "S"), ({"feature_map": "nope"}, "unknown feature map"),
    ({"feature_map": "dpfp", "feature_options": {"nu": 0}}, "nu"), ({"rule": "ours"}, "unknown update rule"),
    ({"setting": "both"}, "setting"), ({"lr": -1.0}, "lr")])
def test_invalid_configs_are_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**fields).validate()


def test_unknown_config_field_is_an_error():
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig.from_dict({"num_pairs": 10, "nmu_pairs": 10})


def test_run_id_is_stable_and_seed_dependent():
    assert RunConfig(num_pairs=10).run_id == RunConfig.from_dict({"num_pairs": 10}).run_id
    assert RunConfig(num_pairs=10).run_id != RunConfig(num_pairs=10, seed=1).run_id


def test_run_id_of_a_user_map_follows_its_source(tmp_path):
    path = tmp_path / "my_map.py"
    path.write_text("import torch\nclass M(torch.nn.Module):\n    d_dot = 4\n")
    config = RunConfig(num_pairs=10, feature_map=f"{path}:M")
    before = config.run_id
    assert config.run_id == before
    path.write_text("import torch\nclass M(torch.nn.Module):\n    d_dot = 8\n")
    assert config.run_id != before


def test_every_run_records_the_code_that_produced_it():
    import subprocess
    from pathlib import Path
    result = train(RunConfig(num_pairs=4, max_steps=2, eval_every=1), progress=False)
    suite = result["versions"]["suite"]
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:                   # a git checkout: the commit, "-dirty" if edited
        assert suite.split("-")[0] == head.stdout.strip()[:12]
    else:
        assert suite == "unknown"


@pytest.mark.parametrize("feature_map,rule", [("tanh", "fwm"), ("linear", "delta"), ("dpfp", "sum"),
                                              ("favor", "sum"), ("linear", "sum")])
def test_runs_of_models_with_compiled_steps_record_which_ran(feature_map, rule):
    from models.rules.native import kernel_name
    result = train(RunConfig(num_pairs=4, max_steps=2, eval_every=1, feature_map=feature_map, rule=rule),
                   progress=False)
    assert result["versions"]["native_steps"] == kernel_name() in ("native", "torch")
    other = train(RunConfig(num_pairs=4, max_steps=2, eval_every=1, feature_map="softmax"),
                  progress=False)
    assert "native_steps" not in other["versions"]


def test_the_recorded_commit_is_read_when_the_run_starts(monkeypatch):
    """A long run trains with the code it loaded; HEAD moving meanwhile must not relabel it."""
    import training.trainer as trainer
    calls = iter(["commit-at-start", "commit-at-end"])
    monkeypatch.setattr(trainer, "library_versions", lambda: {"suite": next(calls)})
    result = train(RunConfig(num_pairs=4, max_steps=2, eval_every=1), progress=False)
    assert result["versions"]["suite"] == "commit-at-start"
