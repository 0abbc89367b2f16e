#!/usr/bin/env python3
"""Command line of the fast-weight retrieval suite.

    python run_retrieval.py train --setting capacity --keys 20 --feature-map dpfp --nu 1 --rule sum
    python run_retrieval.py list

Bad input gets a one-line error and exit status 2; the store is never touched by a run that
cannot start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from training.runtime import bound_openmp_spinning

bound_openmp_spinning()   # before torch is imported (training/runtime.py)

DEFAULT_STORE = "results/retrieval.sqlite"


class UsageError(Exception):
    """Bad input: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="run_retrieval.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train one model and store the run")
    train.add_argument("--setting", choices=("capacity", "overwrite", "mqar"), default=None,
                       help="capacity (Setting 1, L = S), overwrite (Setting 2, L = 2S) or mqar "
                            "(Zoology's multi-query recall; --keys is the number of pairs)")
    train.add_argument("--task-option", action="append", default=[], metavar="NAME=JSON",
                       help="mqar options: vocab_size, seq_len, power_a, filler (noise|vocab|zero), "
                            "noise_vocab_size, eval_pairs (a JSON list), eval_examples")
    train.add_argument("--keys", "-S", type=int, default=None, help="number of pairs S")
    train.add_argument("--preset", default=None,
                       help="a named model preset (see `list`); explicit flags override it")
    train.add_argument("--feature-map", default=None,
                       help="registry name, softmax, package.module:Class or path/file.py:Class")
    train.add_argument("--nu", type=int, default=None, help="DPFP order nu")
    train.add_argument("--features", "-m", type=int, default=None, help="FAVOR+ random features m")
    train.add_argument("--redraw", choices=("per_call", "fixed"), default=None,
                       help="FAVOR+ redraw policy (default per_call, as the paper)")
    train.add_argument("--feature-option", action="append", default=[], metavar="NAME=JSON",
                       help="any other feature-map constructor option, e.g. --feature-option eps=0.1")
    train.add_argument("--rule", default=None, help="update rule: sum, delta, fwm, fwl")
    train.add_argument("--no-normaliser", action="store_true",
                       help="sum rule without the attention denominator")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--seeds", type=int, default=None,
                       help="train N seeds (--seed, --seed + 1, ...) together: one vectorised "
                            "model (training/vectorised.py) per worker process, the seeds split "
                            "between them; each is stored as its own run")
    train.add_argument("--workers", type=int, default=None,
                       help="with --seeds: worker processes, one torch thread each unless "
                            "--threads (default: cores, at most N)")
    train.add_argument("--protocol", choices=("paper", "clean"), default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--d-key", type=int, default=None)
    train.add_argument("--store", default=DEFAULT_STORE, help=f"SQLite results store ({DEFAULT_STORE})")
    train.add_argument("--force", action="store_true", help="re-run and replace a stored run")
    train.add_argument("--no-store", action="store_true", help="do not write the result")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, default=None,
                       help="torch threads (results are bitwise reproducible for a fixed count)")

    commands.add_parser("list", help="feature maps, update rules, settings and presets")

    sweep = commands.add_parser("sweep", help="run a preset or spec-file sweep, resumably")
    source = sweep.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="paper-setting1, paper-setting2, quick, ...")
    source.add_argument("--spec", help="a TOML sweep spec (see training/sweep.py:load_spec)")
    sweep.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 1, or the spec's)")
    sweep.add_argument("--workers", type=int, default=None, help="local worker processes (default: cores)")
    sweep.add_argument("--vectorise-seeds", action="store_true",
                       help="train the seeds of each configuration together as one vectorised "
                            "model (one work item per configuration, split between workers "
                            "that would otherwise idle; see training/vectorised.py)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local")
    sweep.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    sweep.add_argument("--store", default=DEFAULT_STORE)
    sweep.add_argument("--log", default=None, help="also append the per-run status lines to this file")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--dry-run", action="store_true", help="list the pending runs, run nothing")

    plot = commands.add_parser("plot", help="figures from a store")
    plot.add_argument("kind", choices=("capacity", "curves", "setting2", "recall"),
                      help="capacity: Figure 2 (loss vs S); curves: Figure 3 (loss vs step); "
                           "setting2: loss vs S per update rule on the overwrite setting; "
                           "recall: MQAR accuracy against state size")
    plot.add_argument("--store", default=DEFAULT_STORE)
    plot.add_argument("--out", required=True, help="output file (.png, .pdf or .svg)")
    plot.add_argument("--x", default="num_pairs", choices=("num_pairs", "state_size", "d_dot_ratio"),
                      help="x axis of capacity/setting2 plots")
    plot.add_argument("--setting", default=None, help="capacity/overwrite (capacity plot: default capacity)")
    plot.add_argument("--protocol", default=None, help="only runs of this protocol")
    plot.add_argument("--keys", type=int, default=None, help="curves: only runs with this S")
    plot.add_argument("--models", default=None, help="comma-separated model labels to include")
    plot.add_argument("--threshold", type=float, default=None,
                      help="loss below which an S counts as solved (default 1e-2)")
    plot.add_argument("--table", action="store_true",
                      help="capacity: also print the memory-limit table (S* against d_dot)")

    export = commands.add_parser("export", help="the tidy run table as CSV or Parquet")
    export.add_argument("--store", default=DEFAULT_STORE)
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--out", default=None, help="output file (default: next to the store)")
    export.add_argument("--curves", action="store_true", help="export the eval curves instead")

    capacity = commands.add_parser(
        "capacity", help="capacity sweep of a feature map beside reference maps: plot + S* table")
    capacity.add_argument("--feature-map", required=True,
                          help="registry name, package.module:Class or path/file.py:Class")
    capacity.add_argument("--feature-option", action="append", default=[], metavar="NAME=JSON")
    capacity.add_argument("--label", default=None, help="name of your map in plots and tables")
    capacity.add_argument("--rule", default="sum", help="update rule for every model (default sum)")
    capacity.add_argument("--references", default="linear,dpfp1",
                          help="comma-separated model presets to compare with (see `list`)")
    capacity.add_argument("--keys", default="20:200:20",
                          help="S values: START:STOP:STEP or a comma-separated list")
    capacity.add_argument("--seeds", type=int, default=1)
    capacity.add_argument("--max-steps", type=int, default=3000,
                          help="cap per run (the paper protocol allows 100k; 3000 keeps it to minutes)")
    capacity.add_argument("--protocol", choices=("paper", "clean"), default="paper")
    capacity.add_argument("--workers", type=int, default=None)
    capacity.add_argument("--store", default=DEFAULT_STORE)
    capacity.add_argument("--out", default=None, help="plot file (default: results/figures/capacity-<label>.png)")
    capacity.add_argument("--quiet", action="store_true")

    demo = commands.add_parser("demo", help="the quick sweep and its capacity plot")
    demo.add_argument("--store", default=DEFAULT_STORE)
    demo.add_argument("--workers", type=int, default=None)
    return parser


def parse_option(text: str, flag: str = "--feature-option") -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise UsageError(f"{flag} needs NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def config_from_args(args):
    from training.config import ConfigError, RunConfig
    from training.presets import MODEL_PRESETS

    fields: dict = {}
    if args.preset is not None:
        if args.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(MODEL_PRESETS)}")
        fields.update(json.loads(json.dumps(MODEL_PRESETS[args.preset])))
    if args.feature_map is not None and args.feature_map != fields.get("feature_map"):
        fields["feature_options"] = {}
    flags = {"setting": args.setting, "num_pairs": args.keys, "feature_map": args.feature_map,
             "rule": args.rule, "seed": args.seed, "protocol": args.protocol,
             "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
             "d_key": args.d_key}
    fields.update({k: v for k, v in flags.items() if v is not None})
    if "num_pairs" not in fields:
        raise ConfigError("--keys S is required")
    if "feature_map" not in fields:
        raise ConfigError("--feature-map (or --preset) is required")
    options = dict(fields.get("feature_options", {}))
    for flag, name in ((args.nu, "nu"), (args.features, "m"), (args.redraw, "redraw")):
        if flag is not None:
            options[name] = flag
    options.update(parse_option(text, "--feature-option") for text in args.feature_option)
    fields["feature_options"] = options
    if args.task_option:
        fields["task_options"] = dict(parse_option(text, "--task-option") for text in args.task_option)
    if args.no_normaliser:
        fields["rule_options"] = {**fields.get("rule_options", {}), "normaliser": False}
    return RunConfig.from_dict(fields).validate()


def command_train(args) -> int:
    from training.store import ResultsStore
    from training.trainer import summary_line, train

    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    if args.seeds is not None:
        return train_seeds_command(args, config)
    if args.workers is not None:
        raise UsageError("--workers needs --seeds (a single run trains in this process)")
    store = None
    if not args.no_store:
        store = ResultsStore(args.store)  # opened (and checked) before training starts
        if store.has_run(config.run_id) and not args.force:
            print(f"run {config.run_id} is already in {args.store}: "
                  + summary_line({**store.get_run(config.run_id), "config": None}))
            print("(use --force to run it again and replace it)")
            return 0
    result = train(config, progress=not args.quiet)
    print(summary_line(result))
    if store is not None:
        store.put_run(result, replace=args.force)
        store.close()
        print(f"stored in {args.store}")
    return 0 if result["status"] != "failed" else 1


def train_seeds_command(args, config) -> int:
    """train --seeds N: the seeds not yet stored (all with --force), trained together: one
    vectorised group per worker (``spread_groups``), the first in this process
    (``run_groups_at_once``)."""
    from training.store import ResultsStore
    from training.sweep import default_workers, run_groups_at_once, spread_groups
    from training.trainer import summary_line
    from training.vectorised import check_group

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    check_workers(args.workers)
    configs = [config.replace(seed=config.seed + i) for i in range(args.seeds)]
    check_group(configs)
    store = None if args.no_store else ResultsStore(args.store)
    if store is not None and not args.force:
        stored = [c for c in configs if store.has_run(c.run_id)]
        for c in stored:
            print(f"seed {c.seed}: run {c.run_id} is already in {args.store} (--force reruns it)")
        configs = [c for c in configs if c not in stored]
    results: list[dict] = []

    def finished(result: dict) -> None:       # stored at once: an interrupt keeps what finished
        results.append(result)
        print(summary_line(result), flush=True)
        if store is not None:
            store.put_run(result, replace=args.force)

    if configs:
        groups = spread_groups([configs], min(args.workers or default_workers(), len(configs)))
        run_groups_at_once(groups, finished, args.threads or 1)     # in seed order
    if store is not None:
        store.close()
        if results:
            print(f"stored {len(results)} runs in {args.store}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


def command_list(args) -> int:
    from models.feature_maps import FEATURE_MAPS, build_feature_map
    from models.rules import UPDATE_RULES
    from training.presets import MODEL_PRESETS
    from training.sweep import SWEEP_PRESETS

    d_key = 64
    print(f"feature maps (d_dot for d_key = {d_key}):")
    print(f"  {'softmax':<15} no fixed-size state (softmax attention baseline; --rule sum)")
    examples = {"dpfp": [{"nu": n} for n in (1, 2, 3)], "favor": [{"m": m} for m in (64, 128, 512)]}
    for name, cls in FEATURE_MAPS.items():
        for options in examples.get(name, [{}]):
            phi = build_feature_map(name, d_key, **options)
            opts = " ".join(f"--{'features' if k == 'm' else k} {v}" for k, v in options.items())
            flags = ", ".join(f for f, on in (("non-negative", phi.nonnegative), ("random", phi.random)) if on)
            print(f"  {name:<15} {opts:<14} d_dot = {phi.d_dot:<5} {flags}")
    print("  (or your own class: --feature-map package.module:Class or path/to/file.py:Class)")
    print("update rules:")
    for name, cls in UPDATE_RULES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<10} {doc}")
    print("settings:")
    print("  capacity   Setting 1: S distinct keys and values, L = S")
    print("  overwrite  Setting 2: keys and values with replacement, L = 2S, last value wins")
    print("  mqar       Zoology's multi-query associative recall (--keys = number of pairs)")
    print("model presets (train --preset NAME):")
    for name, fields in MODEL_PRESETS.items():
        print(f"  {name:<18} {json.dumps(fields)}")
    print("sweep presets (sweep --preset NAME):")
    for name, build in SWEEP_PRESETS.items():
        doc = " ".join((build.__doc__ or "").split())
        print(f"  {name:<15} {len(build([0])):>4} runs per seed. {doc}")
    return 0


def check_workers(workers) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")


def load_sweep(args):
    from training.sweep import load_spec, preset_sweep
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.preset is not None:
        return preset_sweep(args.preset, args.seeds or 1)
    return load_spec(args.spec, args.seeds)


def command_sweep(args) -> int:
    from tqdm.auto import tqdm

    from training.store import ResultsStore
    from training.sweep import run_sweep

    check_workers(args.workers)
    sweep = load_sweep(args)
    for config in sweep.runs:      # every run checked before anything starts
        config.validate()
    if args.backend == "ray":
        try:
            import ray  # noqa: F401  (checked before the store is touched)
        except ImportError:
            raise UsageError("--backend ray needs Ray: pip install 'ray>=2.9'") from None
    if args.dry_run:
        from pathlib import Path
        stored = set()
        if Path(args.store).exists():
            with ResultsStore(args.store, create=False) as store:
                stored = store.run_ids() - store.failed_run_ids()
        pending = [c for c in {c.run_id: c for c in sweep.runs}.values() if c.run_id not in stored]
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(pending)} not yet in {args.store}")
        for config in pending:
            print(f"  {config.model_label} {config.setting} S={config.num_pairs} seed={config.seed}")
        return 0
    log_file = open(args.log, "a") if args.log else None

    def log(line: str) -> None:
        tqdm.write(line)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    with ResultsStore(args.store) as store:
        start = time.perf_counter()
        counts = run_sweep(sweep, store, args.workers, args.backend, args.ray_address,
                           progress=not args.quiet, log=log, vectorise_seeds=args.vectorise_seeds)
    log(f"sweep {sweep.name} complete: {counts['ran']} ran ({counts['failed']} failed), "
        f"{counts['already_done']} were already stored"
        + (f" ({counts['skipped']} by another process meanwhile)" if counts["skipped"] else "")
        + f", {time.perf_counter() - start:.0f} s; "
        f"store: {args.store}")
    if log_file:
        log_file.close()
    return 0 if counts["failed"] == 0 else 1


def select_runs(args):
    from analysis import load_runs
    from training.store import ResultsStore

    ResultsStore(args.store, create=False).close()     # a clear error for a missing/corrupt store
    runs = load_runs(args.store)
    if args.protocol:
        runs = runs[runs["protocol"] == args.protocol]
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        runs = runs[runs["model"].isin(wanted)]
    if runs.empty:
        raise UsageError(f"no runs in {args.store} match the selection")
    return runs


def command_plot(args) -> int:
    import analysis
    from analysis.limits import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    try:
        if args.kind == "curves":
            curves = analysis.load_curves(args.store, select_runs(args)["run_id"])
            out = analysis.plot_curves(curves, args.out, setting=args.setting, num_pairs=args.keys)
        else:
            runs = select_runs(args)
            if args.kind == "recall":
                out = analysis.plot_recall(runs, args.out)
            elif args.kind == "setting2":
                out = analysis.plot_setting2(runs, args.out, x=args.x, threshold=threshold)
            else:
                out = analysis.plot_capacity(runs, args.out, x=args.x, setting=args.setting or "capacity",
                                             threshold=threshold)
            if args.table:
                print(analysis.capacity_table(analysis.memory_limits(runs, threshold=threshold)))
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"wrote {out}")
    return 0


def command_export(args) -> int:
    from pathlib import Path

    import analysis
    from training.store import ResultsStore

    ResultsStore(args.store, create=False).close()
    kind = "curves" if args.curves else "runs"
    out = args.out or str(Path(args.store).with_name(f"{Path(args.store).stem}-{kind}.{args.format}"))
    try:
        path = (analysis.export_curves if args.curves else analysis.export_runs)(args.store, out, args.format)
    except (ValueError, ImportError) as error:
        raise UsageError(str(error)) from None
    print(f"wrote {path}")
    return 0


def parse_keys(text: str) -> list[int]:
    try:
        if ":" in text:
            start, stop, step = (int(x) for x in text.split(":"))
            if step < 1:
                raise ValueError
            values = list(range(start, stop + 1, step))
        else:
            values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--keys needs START:STOP:STEP or a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"--keys {text!r} gives no S values")
    return values


def command_capacity(args) -> int:
    """Capacity curve and memory limit S* of one feature map beside reference models."""
    from pathlib import Path

    import analysis
    from tqdm.auto import tqdm

    from training.store import ResultsStore
    from training.sweep import Sweep, expand, run_sweep

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    check_workers(args.workers)
    keys = parse_keys(args.keys)
    options = dict(parse_option(text) for text in args.feature_option)
    yours = {"feature_map": args.feature_map, "feature_options": options, "rule": args.rule}
    references = [{"preset": name.strip()} for name in args.references.split(",") if name.strip()]
    common = {"max_steps": args.max_steps, "protocol": args.protocol}
    runs = expand([yours] + references, ["capacity"], keys, range(args.seeds), common)
    for config in runs:
        config.validate()               # checks the feature-map contract before any training
    label = args.label or runs[0].model_label
    sweep = Sweep(f"capacity {label}", runs)
    start = time.perf_counter()
    with ResultsStore(args.store) as store:
        run_sweep(sweep, store, workers=args.workers, progress=not args.quiet, log=tqdm.write)
    table = analysis.load_runs(args.store)
    table = table[table["run_id"].isin({c.run_id for c in runs})].copy()
    if args.label:
        table.loc[table["model"] == runs[0].model_label, "model"] = args.label
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)
    out = args.out or str(Path(args.store).parent / "figures" / f"capacity-{safe}.png")
    path = analysis.plot_capacity(table, out)
    print()
    print(analysis.capacity_table(analysis.memory_limits(table)))
    print()
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; plot: {path}; store: {args.store}")
    return 0


def command_demo(args) -> int:
    """`make demo`: the quick preset on the embedded defaults, then its capacity plot."""
    from pathlib import Path

    import analysis
    from training.store import ResultsStore
    from training.sweep import preset_sweep, run_sweep
    from tqdm.auto import tqdm

    check_workers(args.workers)
    sweep = preset_sweep("quick")
    start = time.perf_counter()
    with ResultsStore(args.store) as store:
        run_sweep(sweep, store, workers=args.workers, log=tqdm.write)
    runs = analysis.load_runs(args.store)
    runs = runs[runs["run_id"].isin({c.run_id for c in sweep.runs})]
    figures = Path(args.store).parent / "figures"
    capacity = analysis.plot_capacity(runs, figures / "quick-capacity.png")
    overwrite = analysis.plot_setting2(runs, figures / "quick-overwrite.png")
    print()
    print(analysis.capacity_table(analysis.memory_limits(runs)))
    print()
    print(f"quick sweep done in {time.perf_counter() - start:.0f} s")
    print(f"capacity plot:  {capacity}")
    print(f"overwrite plot: {overwrite}")
    print(f"store:          {args.store}")
    return 0


def main(argv=None) -> int:
    from training.config import ConfigError
    from training.store import StoreError

    from training.runtime import tune_allocator

    tune_allocator()
    try:
        args = build_parser().parse_args(argv)
        return {"train": command_train, "list": command_list, "sweep": command_sweep,
                "plot": command_plot, "export": command_export, "capacity": command_capacity,
                "demo": command_demo}[args.command](args)
    except (UsageError, ConfigError, StoreError) as error:
        print(f"run_retrieval.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:   # an output path that cannot be written, a --log directory, ...
        where = f": {error.filename}" if error.filename else ""
        print(f"run_retrieval.py: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run_retrieval.py: interrupted; finished runs are in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
