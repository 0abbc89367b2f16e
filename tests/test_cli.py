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


def test_preset_sets_its_hyper_parameters(tmp_path):
    store = tmp_path / "r.sqlite"
    result = cli("train", "--preset", "schlag2021-tanh", "--setting", "overwrite", "--keys", "5",
                 "--max-steps", "100", "--store", str(store), "--quiet")
    assert result.returncode == 0, result.stderr
    from analysis import load_runs
    run = load_runs(store).iloc[0]
    assert run["lr"] == 1e-4 and run["batch_size"] == 128 and run["rule"] == "fwm"
