import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from training.config import ConfigError
from training.store import ResultsStore
from training.sweep import load_spec, pending_runs, preset_sweep, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SPEC = """
name = "tiny"
settings = ["capacity"]
num_pairs = [6, 8]
seeds = 2
[defaults]
max_steps = {steps}
eval_every = 50
[[models]]
preset = "linear"
[[models]]
feature_map = "dpfp"
feature_options = {{ nu = 1 }}
rule = "delta"
"""


def write_spec(tmp_path, steps=100, text=None):
    path = tmp_path / "spec.toml"
    path.write_text(text if text is not None else TINY_SPEC.format(steps=steps))
    return path


def test_paper_presets_have_the_published_run_counts():
    one = preset_sweep("paper-setting1")
    assert len(one.runs) == 240 and len({c.run_id for c in one.runs}) == 240
    assert {c.model_label for c in one.runs} == {
        "Softmax", "Linear sum", "DPFP-1 sum", "DPFP-2 sum", "DPFP-3 sum",
        "FAVOR+ 64 sum", "FAVOR+ 128 sum", "FAVOR+ 512 sum"}
    assert sorted({c.num_pairs for c in one.runs}) == list(range(20, 601, 20))
    two = preset_sweep("paper-setting2")
    assert len(two.runs) == 80 and {c.setting for c in two.runs} == {"overwrite"}
    tanh = [c for c in two.runs if c.feature_map == "tanh"]
    assert tanh and all(c.lr == 1e-4 and c.batch_size == 128 and c.rule == "fwm" for c in tanh)
    assert len(preset_sweep("quick", num_seeds=3).runs) == 3 * len(preset_sweep("quick").runs)


def test_spec_expands_and_rejects_unknown_fields(tmp_path):
    sweep = load_spec(write_spec(tmp_path))
    assert len(sweep.runs) == 2 * 2 * 2
    assert all(c.max_steps == 100 for c in sweep.runs)
    bad = [("nmodels = 1\n[[models]]\npreset = 'linear'\n", "unknown field"),
           ("num_pairs = [8]\n[[models]]\npreset = 'linear'\nlearning_rate = 0.1\n", "unknown config field"),
           ("num_pairs = [8]\n[[models]]\nfeature_map = 'nope'\n", "unknown feature map"),
           ("num_pairs = [8]\n[[models]]\npreset = 'nope'\n", "unknown model preset"),
           ("num_pairs = [1]\n[[models]]\npreset = 'linear'\n", "must be an integer >= 2"),
           ("this is = not toml [", "not valid TOML")]
    for text, message in bad:
        with pytest.raises(ConfigError, match=message):
            sweep = load_spec(write_spec(tmp_path, text=text))
            for config in sweep.runs:
                config.validate()


def test_sweep_resumes_without_duplicates(tmp_path):
    store_path = tmp_path / "r.sqlite"
    sweep = load_spec(write_spec(tmp_path, steps=50))
    with ResultsStore(store_path) as store:
        # pretend an earlier sweep finished two runs
        first_two = type(sweep)(sweep.name, sweep.runs[:2])
        assert run_sweep(first_two, store, workers=1, progress=False)["ran"] == 2
        assert len(pending_runs(sweep, store)) == len(sweep.runs) - 2
        counts = run_sweep(sweep, store, workers=2, progress=False)
        assert counts["ran"] == len(sweep.runs) - 2 and counts["already_done"] == 2
        assert store.run_ids() == {c.run_id for c in sweep.runs}
        assert run_sweep(sweep, store, workers=2, progress=False)["ran"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_runs_stored_meanwhile_by_another_process_are_skipped(tmp_path, workers):
    """Work is handed out as workers free up: a run that another process (a second sweep,
    `train`) stored after this sweep started is not trained twice."""
    from training.sweep import seed_groups
    from training.trainer import train
    sweep = load_spec(write_spec(tmp_path, steps=50))
    with ResultsStore(tmp_path / "r.sqlite") as store:
        order = [c for group in seed_groups(pending_runs(sweep, store), False) for c in group]
        late = order[-1]                       # handed out last
        lines = []

        def log(line):
            lines.append(line)
            if line.startswith("[1/"):         # the first result is in: "another process" stores
                assert store.put_run(train(late, progress=False))

        counts = run_sweep(sweep, store, workers=workers, progress=False, log=log)
        assert counts["skipped"] == 1 and counts["ran"] == len(order) - 1
        assert store.run_ids() == {c.run_id for c in sweep.runs}
    assert [line for line in lines if "stored meanwhile by another process, skipped" in line
            and late.run_id in line]


def test_vectorised_sweep_trains_seeds_together_and_resumes(tmp_path):
    store_path = tmp_path / "r.sqlite"
    sweep = load_spec(write_spec(tmp_path, steps=50))              # 4 configurations x 2 seeds
    with ResultsStore(store_path) as store:
        alone = type(sweep)(sweep.name, sweep.runs[:1])            # seed 0 of the first config
        run_sweep(alone, store, workers=1, progress=False)
        counts = run_sweep(sweep, store, workers=2, progress=False, vectorise_seeds=True)
        assert counts["ran"] == len(sweep.runs) - 1
        assert store.run_ids() == {c.run_id for c in sweep.runs}
        engines = {c.run_id: json.loads(store.get_run(c.run_id)["versions"])["engine"]
                   for c in sweep.runs}
    assert engines[sweep.runs[0].run_id] == "sequential"           # stored before
    assert engines[sweep.runs[1].run_id] == "sequential"           # its group had one run left
    assert sorted(engines.values()).count("vectorised x2") == len(sweep.runs) - 2


def test_spread_groups_splits_the_largest_while_workers_would_idle():
    from training.config import RunConfig
    from training.sweep import spread_groups
    five = [RunConfig(num_pairs=8, seed=s) for s in range(5)]
    other = [RunConfig(num_pairs=6, seed=s) for s in range(2)]
    seeds = lambda groups: [[c.seed for c in group] for group in groups]
    assert seeds(spread_groups([five], 1)) == [[0, 1, 2, 3, 4]]
    assert seeds(spread_groups([five], 2)) == [[0, 1, 2], [3, 4]]
    assert seeds(spread_groups([five], 4)) == [[0], [1], [2], [3, 4]]
    assert seeds(spread_groups([five], 9)) == [[0], [1], [2], [3], [4]]
    assert seeds(spread_groups([five, other], 2)) == [[0, 1, 2, 3, 4], [0, 1]]   # enough items
    assert seeds(spread_groups([other, five], 3)) == [[0, 1], [0, 1, 2], [3, 4]]
    assert spread_groups([], 2) == []


def test_vectorised_sweep_splits_a_lone_group_between_the_workers(tmp_path):
    """One configuration's three seeds on two workers: seeds 0-1 as one vectorised model, seed 2
    as a run of its own, each stored as the run that training it alone at one thread gives."""
    from training.trainer import train
    from training.vectorised import train_seeds
    spec = write_spec(tmp_path, text=TINY_SPEC.format(steps=100).replace("num_pairs = [6, 8]",
                                                                          "num_pairs = [6]")
                      .replace("seeds = 2", "seeds = 3").split("[[models]]\nfeature_map")[0])
    sweep = load_spec(spec)
    assert len(sweep.runs) == 3
    with ResultsStore(tmp_path / "r.sqlite") as store:
        counts = run_sweep(sweep, store, workers=2, progress=False, vectorise_seeds=True)
        assert counts["ran"] == 3
        stored = {c.seed: store.get_run(c.run_id) for c in sweep.runs}
        curves = {c.seed: store.curve(c.run_id) for c in sweep.runs}
    engines = {seed: json.loads(run["versions"])["engine"] for seed, run in stored.items()}
    assert engines == {0: "vectorised x2", 1: "vectorised x2", 2: "sequential"}
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = train_seeds(sweep.runs[:2]) + [train(sweep.runs[2], progress=False)]
    finally:
        torch.set_num_threads(threads)
    for seed, result in enumerate(expected):
        assert [tuple(point) for point in result["curve"]] == curves[seed]       # bitwise
        assert stored[seed]["best_eval_loss"] == result["best_eval_loss"]


def test_groups_at_once_hand_on_the_workers_results_when_interrupted(monkeypatch):
    """Ctrl-C while this process still trains its group: a worker's group that finished
    meanwhile is handed to finished() before the interrupt goes on, not lost."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import training.vectorised
    from training.config import RunConfig
    from training.sweep import _worker_init, run_groups_at_once

    here = [RunConfig(num_pairs=6, max_steps=20, seed=s) for s in (0, 1)]
    there = [RunConfig(num_pairs=6, max_steps=20, seed=s) for s in (2, 3)]
    submitted = []

    class Recording(ProcessPoolExecutor):
        def submit(self, *args, **kwargs):
            submitted.append(super().submit(*args, **kwargs))
            return submitted[-1]

    def interrupted_here(configs, log=None):  # this process only: the worker trains for real
        deadline = time.monotonic() + 240
        while not all(f.done() for f in submitted) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.vectorised, "train_seeds", interrupted_here)
    finished = []
    with Recording(1, mp_context=multiprocessing.get_context("spawn"),
                   initializer=_worker_init, initargs=(1,)) as pool:
        with pytest.raises(KeyboardInterrupt):
            run_groups_at_once([here, there], finished.append, 1, pool)
    assert [r["config"]["seed"] for r in finished] == [2, 3]
    assert all(r["status"] == "done" and r["steps"] == 20 for r in finished)


def test_groups_at_once_train_here_what_no_worker_has_started(monkeypatch):
    """A worker still starting (here: asleep for minutes) when this process is free again: its
    group is trained here instead, without waiting for it, and gives the floats it would have
    (bitwise those of the group trained alone at one thread); the worker, once up, finds the
    group claimed and trains nothing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from training.config import RunConfig
    from training.sweep import (_run_group_with_threads, _stop_workers, run_claimed_group,
                                run_groups_at_once)

    here = [RunConfig(num_pairs=6, max_steps=20, seed=s) for s in (0, 1)]
    stolen = [RunConfig(num_pairs=6, max_steps=20, seed=s) for s in (2, 3)]
    finished, folders = [], []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: folders.append(mkdtemp(**kw)) or folders[-1])
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=time.sleep, initargs=(300,))
    start = time.monotonic()
    try:
        run_groups_at_once([here, stolen], finished.append, 1, pool)
        elapsed = time.monotonic() - start
    finally:
        _stop_workers(pool)
    assert elapsed < 120                                      # the worker's sleep: 300 s
    assert [r["config"]["seed"] for r in finished] == [0, 1, 2, 3]
    for result, alone in zip(finished[2:], _run_group_with_threads(stolen, 1)):
        assert result["status"] == "done" and result["curve"] == alone["curve"]
    # the claims folder is gone once the command is done: a late worker trains nothing
    assert len(folders) == 1 and not os.path.exists(folders[0])
    assert run_claimed_group(folders[0], 1, [here[0].to_dict()]) is None


def test_groups_at_once_train_here_what_nobody_could_claim(monkeypatch):
    """The claims folder gone while the command runs (a /tmp cleaner, say): no claim succeeds
    anywhere, the worker trains nothing, and this process trains every group itself, in
    order, rather than failing on the worker's empty answer. (A thread pool stands in for the
    workers: the same calls, in this process.)"""
    from concurrent.futures import ThreadPoolExecutor

    import training.sweep
    from training.config import RunConfig
    from training.sweep import run_groups_at_once

    groups = [[RunConfig(num_pairs=6, max_steps=10, seed=s) for s in seeds]
              for seeds in ((0, 1), (2,), (3, 4))]
    monkeypatch.setattr(training.sweep, "_claim", lambda claims, index: False)
    finished = []
    with ThreadPoolExecutor(2) as pool:
        run_groups_at_once(groups, finished.append, 1, pool)
    assert [r["config"]["seed"] for r in finished] == [0, 1, 2, 3, 4]
    assert all(r["status"] == "done" for r in finished)


def test_local_worker_leaves_without_teardown_after_flushing_its_output(fresh_python):
    """``_exit_without_teardown`` (a local worker's exit): the output written so far comes out
    and the process ends with status 0 before the exit handlers registered earlier (the
    interpreter's teardown) run."""
    code = ("import atexit\n"
            "from training.sweep import _exit_without_teardown\n"
            "atexit.register(print, 'teardown ran')\n"
            "_exit_without_teardown()\n"
            "print('trained', end='')\n")
    out = fresh_python(code)
    assert (out.returncode, out.stdout) == (0, "trained"), out.stderr


def cli_sweep(spec, store, *extra, **popen):
    command = [sys.executable, os.path.join(ROOT, "run_retrieval.py"), "sweep", "--spec", str(spec),
               "--store", str(store), "--quiet", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def orphans(session_id: int) -> list[int]:
    """Live processes of the killed sweep's session (its spawn workers)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    alive.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return alive


def test_kill_9_mid_sweep_then_resume_completes_exactly_once(tmp_path):
    spec = write_spec(tmp_path, steps=400)
    store_path = tmp_path / "r.sqlite"
    expected = {c.run_id for c in load_spec(spec).runs}
    sweep = cli_sweep(spec, store_path, "--workers", "2")
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and sweep.poll() is None:
        if store_path.exists():
            with ResultsStore(store_path) as store:
                done = store.count()
            if done >= 1:
                break
        time.sleep(0.2)
    assert 1 <= done < len(expected), "the sweep should be interrupted part-way"
    os.kill(sweep.pid, signal.SIGKILL)          # the driver alone, mid-run
    sweep.wait()
    with ResultsStore(store_path) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = store.run_ids()
    # the orphaned workers notice their driver is gone and exit within seconds
    deadline = time.time() + 20
    while time.time() < deadline and orphans(sweep.pid):
        time.sleep(0.5)
    assert not orphans(sweep.pid)
    assert before < expected
    resumed = cli_sweep(spec, store_path, "--workers", "2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{len(before)} already in the store" in out
    with ResultsStore(store_path) as store:
        assert store.run_ids() == expected
        rows = store.conn.execute("SELECT run_id, COUNT(*) FROM runs GROUP BY run_id").fetchall()
        assert all(count == 1 for _, count in rows)


def test_bad_spec_exits_2_before_touching_the_store(tmp_path):
    spec = write_spec(tmp_path, text="num_pairs = [8]\n[[models]]\nfeature_map = 'nope'\n")
    store_path = tmp_path / "r.sqlite"
    process = cli_sweep(spec, store_path)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and len(err.strip().splitlines()) == 1
    assert not store_path.exists()


def test_ray_backend_runs_into_the_same_store(tmp_path):
    pytest.importorskip("ray")
    spec = write_spec(tmp_path, steps=50)
    store_path = tmp_path / "r.sqlite"
    process = cli_sweep(spec, store_path, "--backend", "ray", "--vectorise-seeds",
                        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    with ResultsStore(store_path) as store:
        assert store.run_ids() == {c.run_id for c in load_spec(spec).runs}
        versions = [json.loads(store.get_run(i)["versions"]) for i in store.run_ids()]
    from training.store import suite_commit
    assert {v["suite"] for v in versions} == {suite_commit()}   # workers have no .git: passed on
    assert "complete: 8 ran" in out


def test_update_rules_preset_compares_four_rules_on_both_settings():
    sweep = preset_sweep("update-rules")
    assert {c.rule for c in sweep.runs} == {"sum", "delta", "fwm", "fwl"}
    assert {c.setting for c in sweep.runs} == {"capacity", "overwrite"}
    assert len(sweep.runs) == 4 * 2 * 5
    assert min(c.num_pairs for c in sweep.runs) == 20 and max(c.num_pairs for c in sweep.runs) == 200


def test_failed_runs_are_retried_on_resume(tmp_path):
    sweep = load_spec(write_spec(tmp_path, steps=20))
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run_sweep(sweep, store, workers=1, progress=False)
        victim = sweep.runs[0].run_id
        store.conn.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", (victim,))
        assert [c.run_id for c in pending_runs(sweep, store)] == [victim]
        assert run_sweep(sweep, store, workers=1, progress=False)["ran"] == 1
        assert store.get_run(victim)["status"] == "done" and store.count() == len(sweep.runs)
