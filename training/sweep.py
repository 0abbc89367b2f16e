"""Sweeps: many runs described as data, executed resumably into one results store.

A sweep is a list of RunConfigs. It comes from a built-in preset (``SWEEP_PRESETS``) or from a
small TOML spec file (see ``load_spec``). Execution is resumable by construction: each run's id
is a hash of its config and seed, the store has one row per id, and a run is written in a single
transaction only when it has finished. A sweep killed at any moment (Ctrl-C, kill -9, power
loss) and started again runs exactly the runs that are not in the store.

Backends: local worker processes (default; one torch thread each when several run) or Ray
tasks on a Ray cluster (``backend="ray"``); either way the driver alone writes the store.
"""
from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from training.config import ConfigError, RunConfig
from training.presets import MODEL_PRESETS
from training.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sweep:
    name: str
    runs: list[RunConfig]
    description: str = ""


def model_fields(entry: dict) -> dict:
    """A model entry of a spec or preset: an optional named preset plus explicit fields."""
    entry = dict(entry)
    fields = {}
    preset = entry.pop("preset", None)
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; choose from {', '.join(MODEL_PRESETS)}")
        fields.update(MODEL_PRESETS[preset])
    if "feature_map" in entry and entry["feature_map"] != fields.get("feature_map"):
        fields["feature_options"] = {}
    fields.update(entry)
    return fields


def expand(models: Iterable[dict], settings: Iterable[str], num_pairs: Iterable[int],
           seeds: Iterable[int], defaults: dict | None = None) -> list[RunConfig]:
    """The cross product models x settings x S x seeds, each run validated."""
    runs = []
    for entry in models:
        fields = model_fields(entry)
        entry_settings = [fields.pop("setting")] if "setting" in fields else list(settings)
        entry_pairs = fields.pop("num_pairs", None)
        entry_pairs = list(num_pairs) if entry_pairs is None else (
            entry_pairs if isinstance(entry_pairs, list) else [entry_pairs])
        for setting in entry_settings:
            for S in entry_pairs:
                for seed in seeds:
                    config = RunConfig.from_dict({**(defaults or {}), **fields, "setting": setting,
                                                  "num_pairs": S, "seed": seed})
                    runs.append(config)
    return runs


# --- built-in sweeps ------------------------------------------------------------------------
PAPER_SETTING1_MODELS = ["softmax", "linear", "dpfp1", "dpfp2", "dpfp3", "favor64", "favor128", "favor512"]
PAPER_SETTING2_MODELS = ["dpfp1", "dpfp1-delta", "dpfp2-delta", "linear-delta", "schlag2021-tanh",
                         "schlag2021-dpfp1", "favor64-delta", "favor128-delta"]
QUICK_MAX_STEPS = 3000


def paper_setting1(seeds) -> list[RunConfig]:
    """Figure 2: 8 models x S = 20, 40, ..., 600 on the capacity setting (240 runs per seed)."""
    return expand([{"preset": m} for m in PAPER_SETTING1_MODELS], ["capacity"],
                  range(20, 601, 20), seeds)


def paper_setting2(seeds) -> list[RunConfig]:
    """Setting 2 comparison: 8 models x S = 20, 40, ..., 200 on the overwrite setting (80 runs)."""
    return expand([{"preset": m} for m in PAPER_SETTING2_MODELS], ["overwrite"],
                  range(20, 201, 20), seeds)


def quick(seeds) -> list[RunConfig]:
    """Minutes on a laptop: the capacity knee of Linear (d_dot 64) and DPFP-1 (d_dot 128), and
    delta vs sum on the overwrite setting at S = 20. Runs are capped at 3000 steps."""
    cap = {"max_steps": QUICK_MAX_STEPS}
    return (expand([{"preset": "linear"}, {"preset": "dpfp1"}], ["capacity"],
                   range(20, 161, 20), seeds, cap)
            + expand([{"preset": "dpfp1"}, {"preset": "dpfp1-delta"}], ["overwrite"], [20], seeds, cap))


UPDATE_RULE_MODELS = ["dpfp1", "dpfp1-delta", "schlag2021-dpfp1", "dpfp1-fwl"]


UPDATE_RULE_PAIRS = [20, 60, 100, 150, 200]
UPDATE_RULE_MAX_STEPS = 3000


def update_rules(seeds) -> list[RunConfig]:
    """sum, delta, fwm and fwl (all with DPFP-1 keys) on both settings, S = 20 .. 200
    (5 sizes; runs capped at 3000 steps to fit a laptop: a comparison, not the paper's sweep)."""
    return expand([{"preset": m} for m in UPDATE_RULE_MODELS], ["capacity", "overwrite"],
                  UPDATE_RULE_PAIRS, seeds, {"max_steps": UPDATE_RULE_MAX_STEPS})


MQAR_PAIRS = [4, 8, 16]


def mqar(seeds) -> list[RunConfig]:
    """Zoology-style recall against state size: Linear (sum) and DPFP-1 (delta) at key widths
    8..64 and softmax, trained on N = 4, 8, 16 pairs (laptop-sized task, 2000-step cap)."""
    models = ([{"preset": "linear", "d_key": d} for d in (8, 16, 32, 64)]
              + [{"preset": "dpfp1-delta", "d_key": d} for d in (8, 16, 32)]
              + [{"preset": "softmax", "d_key": 32}])
    return expand(models, ["mqar"], MQAR_PAIRS, seeds,
                  {"max_steps": 2000, "task_options": {"eval_pairs": MQAR_PAIRS}})


SWEEP_PRESETS: dict[str, Callable] = {
    "paper-setting1": paper_setting1,
    "paper-setting2": paper_setting2,
    "quick": quick,
    "update-rules": update_rules,
    "mqar": mqar,
}


def preset_sweep(name: str, num_seeds: int = 1) -> Sweep:
    if name not in SWEEP_PRESETS:
        raise ConfigError(f"unknown sweep preset {name!r}; choose from {', '.join(SWEEP_PRESETS)}")
    if num_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {num_seeds}")
    build = SWEEP_PRESETS[name]
    return Sweep(name, build(range(num_seeds)), (build.__doc__ or "").strip())


# --- spec files -----------------------------------------------------------------------------
SPEC_FIELDS = {"name", "description", "settings", "num_pairs", "seeds", "defaults", "models"}


def load_spec(path: str | os.PathLike, num_seeds: int | None = None) -> Sweep:
    """A sweep from a TOML file::

        name = "my-sweep"
        settings = ["capacity"]                         # or ["capacity", "overwrite"]
        num_pairs = [20, 40, 60]                        # or {start = 20, stop = 200, step = 20}
        seeds = 3                                       # 0, 1, 2 (or an explicit list)
        [defaults]                                      # any RunConfig field, for every run
        max_steps = 5000
        [[models]]
        preset = "dpfp1"                                # a model preset (see `list`) ...
        [[models]]
        feature_map = "dpfp"                            # ... or explicit fields
        feature_options = { nu = 2 }
        rule = "delta"
        num_pairs = [20, 40]                            # a model may override S, setting

    Unknown fields anywhere are an error.
    """
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read sweep spec {path} ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"sweep spec {path} is not valid TOML ({error})") from None
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown field(s) {', '.join(unknown)}")
    if not spec.get("models"):
        raise ConfigError(f"sweep spec {path}: no [[models]]")
    try:
        num_pairs = spec.get("num_pairs", [])
        if isinstance(num_pairs, dict):
            extra = sorted(set(num_pairs) - {"start", "stop", "step"})
            if extra:
                raise ConfigError(f"num_pairs takes start, stop, step; not {', '.join(extra)}")
            num_pairs = list(range(num_pairs["start"], num_pairs["stop"] + 1, num_pairs.get("step", 1)))
        seeds = spec.get("seeds", 1) if num_seeds is None else num_seeds
        seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if not all(isinstance(m, dict) for m in spec["models"]):
            raise ConfigError("each [[models]] entry must be a table of fields")
        runs = expand(spec["models"], spec.get("settings", ["capacity"]), num_pairs, seeds,
                      spec.get("defaults", {}))
    except ConfigError as error:
        raise ConfigError(f"sweep spec {path}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"sweep spec {path}: bad value ({type(error).__name__}: {error})") from None
    if not runs:
        raise ConfigError(f"sweep spec {path} describes no runs (empty num_pairs or seeds?)")
    return Sweep(spec.get("name", path.stem), runs, spec.get("description", ""))


# --- execution ------------------------------------------------------------------------------
def _worker_init(threads: int, watch_parent: bool = False) -> None:
    import torch

    from training.runtime import tune_allocator
    torch.set_num_threads(threads)
    tune_allocator()
    if watch_parent:
        _exit_with_parent()
        _exit_without_teardown()


def _exit_without_teardown() -> None:
    """A local worker leaves at once when its pool shuts it down, once its results are sent and
    its output flushed, without the interpreter's teardown of torch and the suite's modules:
    joining a worker that had trained took about 0.37 s, now about 0.02 s (at the end of
    `train --seeds` and of a sweep). Exit handlers registered before this one do not run."""
    import atexit
    import sys

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(0)
    atexit.register(leave)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A local worker whose driver was killed (kill -9) exits instead of finishing a run whose
    result nobody will store: it would only hold the cores the resumed sweep needs."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_config(config_dict: dict) -> dict:
    """Train one run in a worker (local process or Ray task) and return its record."""
    from training.trainer import train
    return train(RunConfig.from_dict(config_dict), progress=False)


def run_group(config_dicts: list[dict]) -> list[dict]:
    """Train runs that differ only in seed together (training/vectorised.py); their records."""
    if len(config_dicts) == 1:
        return [run_config(config_dicts[0])]
    from training.vectorised import train_seeds
    return train_seeds([RunConfig.from_dict(d) for d in config_dicts])


def seed_groups(pending: list[RunConfig], vectorise: bool) -> list[list[RunConfig]]:
    """The pending runs as work items: one run each, or (vectorise) the runs that differ only
    in seed as one item (MQAR runs stay single), in the order of their first run."""
    if not vectorise:
        return [[c] for c in pending]
    groups: dict[str, list[RunConfig]] = {}
    for config in pending:
        key = config.run_id if config.setting == "mqar" else config.replace(seed=0).run_id
        groups.setdefault(key, []).append(config)
    return list(groups.values())


def spread_groups(groups: list[list[RunConfig]], workers: int) -> list[list[RunConfig]]:
    """The work items split until there are at least ``workers`` of them where they can be:
    while fewer, the largest group (the first of equal ones) becomes its first and second
    halves, in seed order. Five seeds of one configuration on two workers train as seeds
    0-2 and 3-4, each part one vectorised model in its own process. Two processes share a
    step's Python as well as its arithmetic: on the 2-core CPU five Linear S = 100 seeds took
    0.92 s for 300 steps this way, against 1.47 s as one model on two threads (one run:
    0.52 s). More groups than workers are left whole."""
    groups = list(groups)
    while len(groups) < workers:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]), default=None)
        if largest is None or len(groups[largest]) < 2:
            break
        group = groups[largest]
        half = (len(group) + 1) // 2
        groups[largest:largest + 1] = [group[:half], group[half:]]
    return groups


def pending_runs(sweep: Sweep, store: ResultsStore) -> list[RunConfig]:
    """The sweep's runs not yet in the store (or stored as failed: tried again), each once,
    largest first (better load balance)."""
    done = store.run_ids() - store.failed_run_ids()
    unique = {c.run_id: c for c in sweep.runs if c.run_id not in done}
    cost = lambda c: c.num_pairs * (2 if c.setting == "overwrite" else 1) * c.batch_size
    return sorted(unique.values(), key=cost, reverse=True)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, which containers and schedulers
    set), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def run_sweep(sweep: Sweep, store: ResultsStore, workers: int | None = None, backend: str = "local",
              ray_address: str | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, vectorise_seeds: bool = False) -> dict:
    """Run every pending run of the sweep; returns counts. Results are stored as they finish.
    Work is handed out as workers free up, and a run that another process stored meanwhile is
    skipped (counted in "skipped" and "already_done"), so sweeps may share a store.

    vectorise_seeds: the runs that differ only in seed train together as one vectorised model
    (one work item, split in parts while there are fewer items than workers: ``spread_groups``;
    results equal separate runs up to rounding, see training/vectorised.py)."""
    from tqdm.auto import tqdm

    from training.trainer import summary_line

    for config in sweep.runs:
        config.validate()
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    total = len({c.run_id for c in sweep.runs})
    pending = pending_runs(sweep, store)
    retry = store.failed_run_ids()
    workers = workers or default_workers()
    counts = {"total": total, "already_done": total - len(pending), "ran": 0, "failed": 0, "skipped": 0}
    if log:
        where = f"{workers} local workers" if backend == "local" else "ray"
        log(f"sweep {sweep.name}: {total} runs, {counts['already_done']} already in the store, "
            f"{len(pending)} to run on {where}")
    if not pending:
        return counts
    bar = tqdm(total=total, initial=counts["already_done"], desc=sweep.name, unit="run",
               disable=not progress, smoothing=0.05)

    def finished(result: dict) -> None:
        if not store.put_run(result, replace=result["run_id"] in retry) and log:
            log(f"run {result['run_id']} was stored meanwhile by another process; kept that one")
        counts["ran"] += 1
        counts["failed"] += result["status"] == "failed"
        bar.update(1)
        if log:
            log(f"[{counts['already_done'] + counts['ran']}/{total}] {summary_line(result)}")

    def still_pending(group: list[RunConfig]) -> list[RunConfig]:
        """The group's runs that no other process (another sweep, `train`) has stored since the
        sweep started: work is handed out only as workers free up, so none is done twice."""
        stored = store.run_ids() - retry
        left = [c for c in group if c.run_id not in stored]
        for config in group:
            if config.run_id in stored:
                counts["already_done"] += 1
                counts["skipped"] += 1
                bar.update(1)
                if log:
                    log(f"[{counts['already_done'] + counts['ran']}/{total}] {config.model_label} "
                        f"{config.setting} S={config.num_pairs} seed={config.seed}: stored meanwhile "
                        f"by another process, skipped [run {config.run_id}]")
        return left

    try:
        groups = seed_groups(pending, vectorise_seeds)
        if backend == "local":
            _run_local(spread_groups(groups, workers), workers, finished, still_pending)
        elif backend == "ray":
            _run_ray(groups, ray_address, finished, still_pending)
        else:
            raise ConfigError(f"unknown backend {backend!r}; choose local or ray")
    finally:
        bar.close()
    return counts


def worker_pool(workers: int, threads: int = 1):
    """A pool of ``workers`` local worker processes of ``threads`` torch threads each, which
    exit if this process is killed. Spawned: a forked child would inherit the parent's OpenMP
    thread pool in an unusable state."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads, True))


def _run_local(groups: list[list[RunConfig]], workers: int, finished, still_pending) -> None:
    if workers == 1:
        for group in groups:
            group = still_pending(group)
            if group:
                for result in run_group([c.to_dict() for c in group]):
                    finished(result)
        return
    from concurrent.futures import FIRST_COMPLETED, wait

    pool = worker_pool(workers)
    queue = iter(groups)

    def submit_next(in_flight: set) -> None:
        for group in queue:
            group = still_pending(group)
            if group:
                in_flight.add(pool.submit(run_group, [c.to_dict() for c in group]))
                return

    in_flight: set = set()
    try:
        for _ in range(workers):
            submit_next(in_flight)
        while in_flight:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                for result in future.result():
                    finished(result)
                submit_next(in_flight)
    except BaseException:
        # Ctrl-C or an error: stop now. Runs in flight are lost (never half-stored) and rerun
        # on resume; waiting for them could take hours.
        _stop_workers(pool)
        raise
    pool.shutdown()


def _stop_workers(pool) -> None:
    """Shut a process pool down without waiting for its work: its processes are terminated."""
    processes = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def run_groups_at_once(groups: list[list[RunConfig]], finished, threads: int = 1,
                       pool=None) -> None:
    """Train every group at the same time: the first in this process, each other one in a worker
    process (``pool``'s, else a new spawned one), with ``threads`` torch threads each;
    finished(record) for every run, group by group in their order. A single group runs here
    with this process's threads as they are.

    A group that no worker has started by the time this process is free again is trained here
    instead (each group goes to whichever process claims it first: ``run_claimed_group``): a
    worker's start takes about 1.3 s (torch's import), and a short command does not wait for
    it to train what this process has time for."""
    import shutil
    import tempfile

    if len(groups) == 1:
        for result in run_group([c.to_dict() for c in groups[0]]):
            finished(result)
        return
    own_pool = pool is None
    if own_pool:
        pool = worker_pool(len(groups) - 1, threads)
    claims = tempfile.mkdtemp(prefix="fwr-claims-")
    futures, handed, worker_trained = [], set(), False

    def hand(future) -> list[dict] | None:
        results = future.result()         # an interrupt while waiting leaves it unhanded
        handed.add(future)
        return results

    try:
        futures = [pool.submit(run_claimed_group, claims, index, [c.to_dict() for c in group])
                   for index, group in enumerate(groups[1:], start=1)]
        for index, group in enumerate(groups):
            # A worker's results if it claimed the group first; None if it trained nothing
            # either (the claims folder gone, say, by a /tmp cleaner): then trained here.
            results = hand(futures[index - 1]) if index and not _claim(claims, index) else None
            worker_trained = worker_trained or results is not None
            if results is None:
                results = _run_group_with_threads(group, threads)
            for result in results:
                finished(result)
    except BaseException:
        # Ctrl-C or an error: the workers' groups that finished meanwhile are handed on, not
        # lost with the ones still running.
        for future in futures:
            if (future not in handed and future.done() and not future.cancelled()
                    and future.exception() is None and future.result() is not None):
                for result in hand(future):
                    finished(result)
        if own_pool:                  # as _run_local: stop the workers now
            _stop_workers(pool)
        raise
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    if own_pool:
        # Every group is in. If no worker trained one, the workers may still be starting:
        # stopped, not waited for. Otherwise joined (idle workers leave at once:
        # ``_exit_without_teardown``): terminating them then made multiprocessing warn of
        # leaked semaphores at exit.
        pool.shutdown() if worker_trained else _stop_workers(pool)


def _run_group_with_threads(group: list[RunConfig], threads: int) -> list[dict]:
    """run_group in this process at ``threads`` torch threads (its own count put back after)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_group([c.to_dict() for c in group])
    finally:
        torch.set_num_threads(previous)


def run_claimed_group(claims: str, index: int, config_dicts: list[dict]) -> list[dict] | None:
    """A worker's side of ``run_groups_at_once``: run_group if this process claims work item
    ``index`` first, else None (another process trains it)."""
    return run_group(config_dicts) if _claim(claims, index) else None


def _claim(claims: str, index: int) -> bool:
    """True for the first process to ask for work item ``index`` of the folder ``claims``
    (an exclusive create: atomic between the processes of one machine); False for every later
    one, and once the folder is gone (its command has finished or stopped)."""
    try:
        os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except (FileExistsError, FileNotFoundError):
        return False
    return True


def _run_ray(groups: list[list[RunConfig]], address: str | None, finished, still_pending) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'ray>=2.9'") from None
    if not ray.is_initialized():
        # The repository travels to every node as the job's working directory.
        from training.store import SUITE_COMMIT_ENV, suite_commit
        runtime_env = {"working_dir": str(ROOT),
                       "excludes": [".venv/", ".git/", "results/", "**/__pycache__/", "*.sqlite*"],
                       "env_vars": {SUITE_COMMIT_ENV: suite_commit()}}
        try:
            ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise ConfigError(f"cannot connect to Ray at {address or 'a new local instance'}: {error}") from None

    @ray.remote(num_cpus=1)
    def ray_run(config_dicts: list[dict]) -> list[dict]:
        _worker_init(1)
        return run_group(config_dicts)

    # Keep every CPU of the cluster busy plus a few tasks queued (their demand is what makes an
    # autoscaling cluster grow; the CPU count is read again as tasks finish) and hand out the
    # rest as tasks finish, skipping runs stored meanwhile by another process, as locally.
    queue = iter(spread_groups(groups, max(1, int(ray.cluster_resources().get("CPU", 1)))))
    remaining: list = []

    def top_up() -> None:
        slots = max(1, int(ray.cluster_resources().get("CPU", 1))) + 4
        while len(remaining) < slots:
            group = next((g for g in map(still_pending, queue) if g), None)
            if group is None:
                return
            remaining.append(ray_run.remote([c.to_dict() for c in group]))

    try:
        top_up()
        while remaining:
            ready, remaining[:] = ray.wait(remaining, num_returns=1)
            for result in ray.get(ready[0]):
                finished(result)
            top_up()
    except BaseException:
        for ref in remaining:
            ray.cancel(ref, force=True)
        raise
