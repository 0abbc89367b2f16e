import os
import signal
import subprocess
import sqlite3
import sys
import textwrap
import time

import pytest

from analysis import load_curves, load_runs
from training.config import RunConfig
from training.store import ResultsStore, StoreError
from training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result():
    return train(RunConfig(num_pairs=8, max_steps=200), progress=False)


def test_put_and_load(tmp_path, result):
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as store:
        assert not store.has_run(result["run_id"])
        store.put_run(result)
        assert store.has_run(result["run_id"])
        assert store.count() == 1
        assert len(store.curve(result["run_id"])) == len(result["curve"])
        # a second writer of the same run (another process sharing the store) is ignored
        assert store.put_run({**result, "best_eval_loss": -1.0}) is False
        assert store.get_run(result["run_id"])["best_eval_loss"] == result["best_eval_loss"]
        store.put_run(result, replace=True)
        assert store.count() == 1
    runs = load_runs(path)
    assert runs.loc[0, "run_id"] == result["run_id"]
    assert runs.loc[0, "best_eval_loss"] == pytest.approx(result["best_eval_loss"])
    assert runs.loc[0, "versions"]["torch"]
    curves = load_curves(path)
    assert list(curves["step"]) == [s for s, _, _ in result["curve"]]


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a valid results store"):
        ResultsStore(bad)
    assert bad.read_bytes() == b"not a database at all" * 100
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="not a results store"):
        ResultsStore(other)
    with pytest.raises(StoreError, match="does not exist"):
        ResultsStore(tmp_path / "missing.sqlite", create=False)


def test_killed_mid_write_leaves_no_half_run(tmp_path, result):
    """kill -9 inside a write transaction: the store stays readable and has no partial row."""
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as store:
        store.put_run(result)
    result = {k: v for k, v in result.items() if k != "versions"}
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from training.store import ResultsStore
        store = ResultsStore({str(path)!r})
        result = {{**{result!r}, "run_id": "half-written"}}
        store.conn.execute("BEGIN IMMEDIATE")
        store.put_run(result)          # inside the open transaction: written, not committed
        print("inside", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "inside"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with ResultsStore(path) as store:
        assert store.run_ids() == {result["run_id"]}
        assert store.curve("half-written") == []
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
