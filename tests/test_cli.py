import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_retrieval.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_reaches_target_and_is_stored(tmp_path):
    store = tmp_path / "r.sqlite"
    command = ["train", "--setting", "capacity", "--keys", "20", "--feature-map", "dpfp", "--nu", "1",
               "--rule", "sum", "--store", str(store), "--quiet"]
    first = cli(*command)
    assert first.returncode == 0, first.stderr
    assert "solved" in first.stdout and "stored in" in first.stdout
    from analysis import load_runs
    runs = load_runs(store)
    assert len(runs) == 1 and runs.loc[0, "best_eval_loss"] <= 1e-3
    again = cli(*command)
    assert again.returncode == 0 and "already in" in again.stdout
    assert len(load_runs(store)) == 1


@pytest.mark.parametrize("args,message", [
    (["--keys", "1", "--feature-map", "linear"], "S (--keys)"),
    (["--keys", "20", "--feature-map", "foo"], "unknown feature map 'foo'"),
    (["--keys", "20", "--feature-map", "dpfp", "--nu", "0"], "nu >= 1"),
    (["--keys", "20", "--feature-map", "linear", "--rule", "ours"], "unknown update rule"),
    (["--keys", "20"], "--feature-map"),
    (["--keys", "ten", "--feature-map", "linear"], "invalid int value"),
    (["--keys", "20", "--preset", "nope"], "unknown preset"),
])
def test_bad_input_is_one_line_exit_2_and_store_untouched(tmp_path, args, message):
    store = tmp_path / "r.sqlite"
    result = cli("train", *args, "--store", str(store))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not store.exists()


def test_corrupt_store_is_refused_and_kept(tmp_path):
    store = tmp_path / "r.sqlite"
    store.write_bytes(b"garbage" * 50)
    result = cli("train", "--keys", "10", "--feature-map", "linear", "--store", str(store))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a valid results store" in result.stderr
    assert store.read_bytes() == b"garbage" * 50


def test_list_shows_maps_with_d_dot():
    result = cli("list")
    assert result.returncode == 0
    assert "d_dot = 384" in result.stdout            # DPFP-3 at d_key = 64
    assert "schlag2021-tanh" in result.stdout and "delta" in result.stdout
    assert "paper-setting1   240 runs per seed" in result.stdout


def test_preset_sets_its_hyper_parameters(tmp_path):
    store = tmp_path / "r.sqlite"
    result = cli("train", "--preset", "schlag2021-tanh", "--setting", "overwrite", "--keys", "5",
                 "--max-steps", "100", "--store", str(store), "--quiet")
    assert result.returncode == 0, result.stderr
    from analysis import load_runs
    run = load_runs(store).iloc[0]
    assert run["lr"] == 1e-4 and run["batch_size"] == 128 and run["rule"] == "fwm"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from training.config import RunConfig
    from training.store import ResultsStore
    from training.trainer import train
    path = tmp_path_factory.mktemp("store") / "r.sqlite"
    with ResultsStore(path) as store:
        for setting in ("capacity", "overwrite"):
            for S in (6, 10):
                for fm, options in (("linear", {}), ("dpfp", {"nu": 1})):
                    store.put_run(train(RunConfig(setting=setting, num_pairs=S, feature_map=fm,
                                                  feature_options=options, max_steps=60, eval_every=20),
                                        progress=False))
    return path


@pytest.mark.parametrize("kind,extra", [("capacity", ["--table"]), ("capacity", ["--x", "state_size"]),
                                        ("setting2", []), ("curves", ["--keys", "6"])])
def test_plot_writes_figures(small_store, tmp_path, kind, extra):
    out = tmp_path / f"{kind}.png"
    result = cli("plot", kind, "--store", str(small_store), "--out", str(out), *extra)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "--table" in extra:
        assert "S* (largest solved)" in result.stdout and "DPFP-1 sum" in result.stdout


def test_export_csv(small_store, tmp_path):
    out = tmp_path / "runs.csv"
    result = cli("export", "--store", str(small_store), "--format", "csv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    import pandas as pd
    assert len(pd.read_csv(out)) == 8


def test_plot_and_export_refuse_missing_store(tmp_path):
    for args in (["plot", "capacity", "--out", str(tmp_path / "x.png")], ["export"]):
        result = cli(*args, "--store", str(tmp_path / "missing.sqlite"))
        assert result.returncode == 2 and "does not exist" in result.stderr


def test_capacity_command_with_a_map_from_a_file_outside_the_repo(tmp_path):
    user_file = tmp_path / "elsewhere" / "my_map.py"
    user_file.parent.mkdir()
    user_file.write_text(
        "import torch\n"
        "class ReluSquared(torch.nn.Module):\n"
        "    nonnegative = True\n"
        "    random = False\n"
        "    def __init__(self, d_key, scale=1.0):\n"
        "        super().__init__(); self.d_key = d_key; self.d_dot = d_key; self.scale = scale\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.scale * x) ** 2\n")
    store, out = tmp_path / "r.sqlite", tmp_path / "cap.png"
    result = cli("capacity", "--feature-map", f"{user_file}:ReluSquared", "--feature-option", "scale=0.5",
                 "--label", "mine", "--keys", "6,10", "--max-steps", "60", "--workers", "1",
                 "--store", str(store), "--out", str(out), "--quiet", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert out.exists()
    table = result.stdout
    for model in ("mine", "Linear sum", "DPFP-1 sum"):
        assert f"| {model} |" in table
    bad = cli("capacity", "--feature-map", f"{user_file}:Nope", "--store", str(store), "--quiet")
    assert bad.returncode == 2 and "no class 'Nope'" in bad.stderr


def test_capacity_refuses_a_map_that_breaks_its_contract(tmp_path):
    user_file = tmp_path / "bad_map.py"
    user_file.write_text(
        "import torch\n"
        "class Signed(torch.nn.Module):\n"
        "    def __init__(self, d_key):\n"
        "        super().__init__(); self.d_dot = d_key\n"
        "    def forward(self, x):\n"
        "        return x\n"
        "class WrongWidth(Signed):\n"
        "    def forward(self, x):\n"
        "        return torch.cat([x, x], -1)\n")
    store = tmp_path / "r.sqlite"
    signed = cli("capacity", "--feature-map", f"{user_file}:Signed", "--rule", "delta",
                 "--store", str(store), "--quiet")
    assert signed.returncode == 2 and "negative" in signed.stderr
    wide = cli("capacity", "--feature-map", f"{user_file}:WrongWidth", "--store", str(store), "--quiet")
    assert wide.returncode == 2 and "128" in wide.stderr and "64" in wide.stderr
    assert not store.exists()


@pytest.mark.parametrize("args,message", [
    (["sweep", "--spec", "."], "cannot read sweep spec"),
    (["capacity", "--feature-map", "linear", "--workers", "-1"], "--workers must be >= 1"),
    (["capacity", "--feature-map", "linear", "--keys", "20:40:0"], "--keys needs"),
    (["train", "--keys", "10", "--feature-map", "linear", "--seed", "99999999999999999999"], "seed must be"),
    (["train", "--keys", "10", "--feature-map", "softmax", "--no-normaliser"], "softmax takes no"),
    (["train", "--setting", "mqar", "--keys", "4", "--feature-map", "linear",
      "--task-option", "eval_pairs=8"], "eval_pairs"),
    (["train", "--setting", "mqar", "--keys", "4", "--feature-map", "linear",
      "--task-option", "power_a=0"], "power_a"),
    (["sweep", "--preset", "quick", "--dry-run"], "not yet in"),
])
def test_more_bad_input_is_one_line_and_store_untouched(tmp_path, args, message):
    store = tmp_path / "r.sqlite"
    result = cli(*args, "--store", str(store))
    output = result.stdout if "--dry-run" in args else result.stderr
    assert message in output
    if "--dry-run" not in args:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not store.exists()


def test_bad_spec_values_are_one_line_errors(tmp_path):
    for text in ("num_pairs = {start = 20, stop = 40, step = 0}\n[[models]]\npreset = 'linear'\n",
                 "num_pairs = {stop = 40}\n[[models]]\npreset = 'linear'\n",
                 "num_pairs = [8]\nmodels = ['linear']\n",
                 "num_pairs = [8]\n[defaults]\nlr = 'abc'\n[[models]]\npreset = 'linear'\n",
                 "num_pairs = [8]\n[[models]]\npreset = 'linear'\nfeature_options = 3\n"):
        spec = tmp_path / "spec.toml"
        spec.write_text(text)
        result = cli("sweep", "--spec", str(spec), "--store", str(tmp_path / "r.sqlite"))
        assert result.returncode == 2, (text, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "r.sqlite").exists()


def test_unwritable_output_is_one_line_error(small_store, tmp_path):
    result = cli("export", "--store", str(small_store), "--out", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_train_seeds_together_stores_each_seed_and_skips_stored_ones(tmp_path):
    store = tmp_path / "r.sqlite"
    common = ["train", "--keys", "8", "--feature-map", "linear", "--max-steps", "200",
              "--store", str(store), "--quiet"]
    first = cli(*common, "--seeds", "2")
    assert first.returncode == 0, first.stderr
    assert "stored 2 runs" in first.stdout
    from analysis import load_runs
    runs = load_runs(store)
    assert sorted(runs["seed"]) == [0, 1]
    again = cli(*common, "--seeds", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already in") == 2 and "stored 1 runs" in again.stdout
    assert sorted(load_runs(store)["seed"]) == [0, 1, 2]


def test_train_seeds_on_workers_splits_the_seeds_and_stores_them_in_order(tmp_path):
    """--seeds 3 --workers 2: seeds 0-1 as one vectorised model in the command's process, seed 2
    in a worker process; the same runs as --workers 1 trains them up to rounding."""
    import json
    from training.store import ResultsStore
    common = ["train", "--keys", "8", "--feature-map", "linear", "--max-steps", "200", "--quiet",
              "--seeds", "3"]
    split = cli(*common, "--workers", "2", "--store", str(tmp_path / "split.sqlite"))
    assert split.returncode == 0, split.stderr
    assert [line.split("seed=")[1][0] for line in split.stdout.splitlines() if "seed=" in line] \
        == ["0", "1", "2"] and "stored 3 runs" in split.stdout
    whole = cli(*common, "--workers", "1", "--store", str(tmp_path / "whole.sqlite"))
    assert whole.returncode == 0, whole.stderr
    with ResultsStore(tmp_path / "split.sqlite") as a, ResultsStore(tmp_path / "whole.sqlite") as b:
        assert a.run_ids() == b.run_ids() and len(a.run_ids()) == 3
        for run_id in a.run_ids():
            x, y = a.get_run(run_id), b.get_run(run_id)
            assert x["seed"] in (0, 1, 2) and x["steps"] == y["steps"] == 200
            assert abs(x["final_eval_loss"] - y["final_eval_loss"]) < 1e-4
        engines = sorted(json.loads(a.get_run(r)["versions"])["engine"] for r in a.run_ids())
        assert engines == ["sequential", "vectorised x2", "vectorised x2"]
        assert {json.loads(b.get_run(r)["versions"])["engine"] for r in b.run_ids()} \
            == {"vectorised x3"}


@pytest.mark.parametrize("args,message", [
    (["--keys", "8", "--feature-map", "linear", "--seeds", "0"], "--seeds must be >= 1"),
    (["--keys", "8", "--feature-map", "linear", "--seeds", "2", "--workers", "0"],
     "--workers must be >= 1"),
    (["--keys", "8", "--feature-map", "linear", "--workers", "2"], "--workers needs --seeds"),
    (["--setting", "mqar", "--keys", "4", "--feature-map", "linear", "--seeds", "2"],
     "capacity and overwrite"),
])
def test_train_seeds_bad_input(tmp_path, args, message):
    store = tmp_path / "r.sqlite"
    result = cli("train", *args, "--store", str(store))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not store.exists()


@pytest.mark.parametrize("user_env, expected", [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                                ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_cli_bounds_openmp_spinning_before_torch_loads_unless_the_user_chose(user_env, expected):
    """libgomp reads its wait policy once, when torch loads it: the CLI sets the spin count
    (training/runtime.py) before anything imports torch, and leaves a user's choice alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    probe = ("import os, sys; import run_retrieval; "
             "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, **user_env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", str(expected)]
