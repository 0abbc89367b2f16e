"""Speed of the retrieval suite against the authors' original code (measured on this 2-core CPU).

    python benchmarks/bench.py [--quick] [--passes N] [--original PATH]
                               [--out benchmarks/results/latest.csv]

Prints and writes to CSV:

1. Per paper configuration: seconds per 100 training steps (a whole step as train() runs it:
   sample_batch, forward, loss.item(), zero_grad, backward, Adam) and seconds per evaluation
   (training.trainer.evaluate: 20 sequences, every query), one torch thread, against the
   original code's figures; targets: training >= 30x faster, evaluation >= 100x faster.
   Each figure is the minimum over repeats of a block of steps (after warm-up), as wall time;
   the process CPU time of the same block is shown beside it (other processes on the machine
   inflate wall time, not CPU time). With --passes N all configurations are timed N times,
   one pass after the other, and each figure is its minimum over the passes.
2. Delta-rule kernel, forward + backward of (o, S_L) in fp32, B = 32, d_v = L / 2: our
   chunkwise form (models/rules/delta.py) vs our sequential loop vs flash-linear-attention's
   pure-PyTorch chunkwise reference (fla/ops/delta_rule/naive.py, loaded by file path; skipped
   with a note when the package is not installed). Targets: >= 1.5x faster than fla naive and
   >= 3x faster than the loop.
3. Peak RSS of the largest paper runs (50 steps + one evaluation, each in its own process,
   started before anything else runs here); target <= 2 GB.
4. Five seeds trained together (training/vectorised.py) against one run: wall time of 300
   protocol steps, each at one and two torch threads, and the seeds also as `train --seeds`
   splits them over two processes (seeds 0-2 and 3-4, one thread each); the best of each;
   target <= 2x.
5. (full run) one vs two torch threads for single runs.

With ``--original PATH`` (the authors' synthetic/ folder, benchmarks/original.py), the original
code is also timed here, configuration by configuration, and the speed-ups against it on this
machine are printed beside those against the fixed figures.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.runtime import bound_openmp_spinning  # noqa: E402

bound_openmp_spinning()   # before torch is imported (training/runtime.py)

import torch  # noqa: E402

from tasks import sample_batch  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.presets import MODEL_PRESETS  # noqa: E402
from models.stacked import StackedRetrievalModel  # noqa: E402
from training.runtime import tune_allocator  # noqa: E402
from training.trainer import evaluate, make_model, make_optimizer  # noqa: E402
from benchmarks.original import OriginalCodeError, check_folder, time_original  # noqa: E402

TRAIN_TARGET, EVAL_TARGET, FLA_TARGET, LOOP_TARGET, RSS_TARGET_MB = 30.0, 100.0, 1.5, 3.0, 2048
SEED_TARGET = 2.0

# (label, setting, S, preset, original s / 100 steps, original s / evaluation or None, quick?)
PAPER_CONFIGS = [
    ("Setting 1, Linear (sum)", "capacity", 100, "linear", 1.6, 0.48, True),
    ("Setting 1, Linear (sum)", "capacity", 300, "linear", 15.4, 10.3, False),
    ("Setting 1, Linear (sum)", "capacity", 600, "linear", 72, 49, True),
    ("Setting 1, DPFP-3 (sum)", "capacity", 300, "dpfp3", 17.4, 11.5, False),
    ("Setting 1, DPFP-3 (sum)", "capacity", 600, "dpfp3", 82, 51, False),
    ("Setting 1, Softmax", "capacity", 300, "softmax", 11.3, 6.7, False),
    ("Setting 1, Softmax", "capacity", 600, "softmax", 58, 34, True),
    ("Setting 1, FAVOR+ 512 (sum)", "capacity", 600, "favor512", 197, None, False),
    ("Setting 2, DPFP-1 delta", "overwrite", 20, "dpfp1-delta", 5.7, 0.14, True),
    ("Setting 2, DPFP-1 delta", "overwrite", 100, "dpfp1-delta", 87, 5.4, True),
    ("Setting 2, DPFP-1 delta", "overwrite", 200, "dpfp1-delta", 435, 37, False),
    ("Setting 2, DPFP-2 delta", "overwrite", 200, "dpfp2-delta", 896, None, False),
    ("Setting 2, Schlag (2021) tanh FWM (B 128)", "overwrite", 20, "schlag2021-tanh", 12.4, 0.13, True),
]
# Where the original code's figures above were measured (one thread per run).
ORIGINAL_MACHINE = "the authors' code on a 2-core AMD EPYC Zen 4 with AVX-512"
# Largest paper runs, for peak memory (each in its own process).
RSS_CONFIGS = [("capacity", 600, "favor512"), ("capacity", 600, "dpfp3"),
               ("overwrite", 200, "dpfp2-delta"), ("capacity", 600, "softmax")]


def paper_config(setting: str, num_pairs: int, preset: str) -> RunConfig:
    return RunConfig(setting=setting, num_pairs=num_pairs, **MODEL_PRESETS[preset])


def best_of(fn, repeats: int, budget_s: float) -> tuple[float, float]:
    """(wall, cpu) seconds per call of fn: the minimum over `repeats` blocks of calls, a block
    lasting about budget_s / repeats."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(budget_s / repeats / once))
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        best_wall = min(best_wall, (time.perf_counter() - wall) / calls)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / calls)
    return best_wall, best_cpu


def time_paper_config(config: RunConfig, budget_s: float) -> dict:
    """Seconds per training step and per evaluation, as the trainer runs them."""
    model = make_model(config)
    optimizer = make_optimizer(model.parameters(), config.lr)        # as training.trainer.train
    data_gen = torch.Generator().manual_seed(0)
    eval_gen = torch.Generator().manual_seed(1)

    def step():
        batch = sample_batch(config.setting, config.num_pairs, config.batch_size, data_gen)
        loss = model.loss(batch)
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    step_wall, step_cpu = best_of(step, 3, budget_s)
    sample_wall, _ = best_of(lambda: sample_batch(config.setting, config.num_pairs,
                                                  config.batch_size, data_gen), 3, 0.1)
    evaluate(model, config, eval_gen)
    eval_wall, eval_cpu = best_of(lambda: evaluate(model, config, eval_gen), 3, budget_s / 2)
    return dict(step_wall=step_wall, step_cpu=step_cpu, sample_wall=sample_wall,
                eval_wall=eval_wall, eval_cpu=eval_cpu)


def load_fla_naive():
    """fla/ops/delta_rule/naive.py by file path (the package's Triton parts do not run on CPU)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("einops") is None:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "ops" / "delta_rule" / "naive.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    return None


def kernel_inputs(B: int, L: int, d_k: int, d_v: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.elu(torch.randn(B, L, d_k, generator=gen)) + 1
    k = torch.nn.functional.elu(torch.randn(B, L, d_k, generator=gen)) + 1
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)      # sum-normalised
    v = torch.randn(B, L, d_v, generator=gen)
    beta = torch.rand(B, L, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, beta)]


def time_kernel(form, inputs, budget_s: float) -> float:
    """Forward + backward of sum(o * w1) + sum(S * w2); wall seconds per call."""
    o, S = form(*inputs)
    w1, w2 = torch.randn_like(o), torch.randn_like(S)

    def run():
        o, S = form(*inputs)
        ((o * w1).sum() + (S * w2).sum()).backward()
        for x in inputs:
            x.grad = None
    return best_of(run, 2, budget_s)[0]


def fla_chunk(L: int) -> int:
    """fla's naive chunkwise needs L divisible by its chunk: the largest of 64/40/32/16/8."""
    return next(c for c in (64, 40, 32, 16, 8) if L % c == 0)


def kernel_rows(quick: bool, budget_s: float) -> list[dict]:
    from models.rules.delta import delta_rule_chunkwise, delta_rule_recurrent
    fla = load_fla_naive()
    if fla is None:
        print("note: flash-linear-attention is not installed: the fla naive column is skipped "
              "(pip install --no-deps fla-core==0.6.0 einops)")
    rows = []
    lengths, widths = ((40, 400), (64, 128)) if quick else ((40, 400, 1200), (64, 128, 384))
    B = 32
    for d_k in widths:
        for L in lengths:
            d_v = L // 2
            inputs = kernel_inputs(B, L, d_k, d_v)
            ours = time_kernel(lambda q, k, v, b: delta_rule_chunkwise(q, k, v, b, 32), inputs, budget_s)
            # The loop keeps L states of B x d_k x d_v floats for its backward.
            loop_gb = L * B * d_k * d_v * 4 / 1e9
            loop = (time_kernel(delta_rule_recurrent, inputs, budget_s)
                    if loop_gb < 1.5 and not (quick and L > 400) else None)
            if fla is not None:
                chunk = fla_chunk(L)
                # fla works on [B, H, L, d]; it scales q by d_k^-1/2 (a constant, same cost).
                fla_form = lambda q, k, v, b: fla.delta_rule_chunkwise(
                    q[:, None], k[:, None], v[:, None], b[:, None], chunk_size=chunk)
                fla_time = time_kernel(fla_form, inputs, budget_s)
            else:
                chunk, fla_time = None, None
            rows.append(dict(d_dot=d_k, L=L, d_v=d_v, ours_ms=ours * 1e3,
                             loop_ms=None if loop is None else loop * 1e3,
                             loop_note="" if loop is not None else f"skipped ({loop_gb:.1f} GB of states)",
                             fla_ms=None if fla_time is None else fla_time * 1e3, fla_chunk=chunk))
            print(format_kernel_row(rows[-1]), flush=True)
    return rows


def rss_child(setting: str, num_pairs: int, preset: str, steps: int) -> None:
    """Run `steps` training steps and one evaluation, as a sweep worker does; print this
    process's peak RSS (MB)."""
    torch.set_num_threads(1)
    tune_allocator()
    config = paper_config(setting, num_pairs, preset)
    model = make_model(config)
    optimizer = make_optimizer(model.parameters(), config.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(sample_batch(config.setting, config.num_pairs, config.batch_size, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    evaluate(model, config, torch.Generator().manual_seed(1))
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss_rows(quick: bool) -> list[dict]:
    rows = []
    configs = RSS_CONFIGS[:1] if quick else RSS_CONFIGS
    for setting, num_pairs, preset in configs:
        steps = 10 if quick else 50
        out = subprocess.run([sys.executable, __file__, "--rss-child", setting, str(num_pairs), preset,
                              str(steps)], capture_output=True, text=True, cwd=ROOT)
        children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        try:
            own_mb = json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]
        except (IndexError, ValueError, KeyError):
            print(out.stderr[-2000:])
            own_mb = None
        label = paper_config(setting, num_pairs, preset).model_label
        rows.append(dict(config=f"{label} S={num_pairs}", steps=steps, rss_mb=own_mb,
                         children_max_mb=children_mb))
        print(f"  {label:22s} S={num_pairs:<4d} {steps} steps + 1 eval: peak RSS "
              f"{own_mb if own_mb is None else round(own_mb)} MB (all children so far: "
              f"{children_mb:.0f} MB) {verdict(own_mb is not None and own_mb <= RSS_TARGET_MB)}",
              flush=True)
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def format_kernel_row(row: dict) -> str:
    loop = f"{row['loop_ms']:9.1f}" if row["loop_ms"] is not None else f"{'-':>9s}"
    fla = f"{row['fla_ms']:9.1f}" if row["fla_ms"] is not None else f"{'-':>9s}"
    parts = [f"  d_dot {row['d_dot']:4d}  L {row['L']:5d}  d_v {row['d_v']:4d} | ours {row['ours_ms']:8.1f} ms"
             f" | loop {loop} ms | fla naive (C={row['fla_chunk']}) {fla} ms |"]
    if row["loop_ms"] is not None:
        ratio = row["loop_ms"] / row["ours_ms"]
        parts.append(f" vs loop {ratio:5.1f}x {verdict(ratio >= LOOP_TARGET)}")
    else:
        parts.append(f" loop {row['loop_note']}")
    if row["fla_ms"] is not None:
        ratio = row["fla_ms"] / row["ours_ms"]
        parts.append(f" | vs fla {ratio:4.2f}x {verdict(ratio >= FLA_TARGET)}")
    return "".join(parts)


# (setting, S, preset, quick?) for seeds trained together
SEED_CONFIGS = [("capacity", 100, "linear", True), ("overwrite", 20, "dpfp1-delta", True),
                ("overwrite", 20, "schlag2021-tanh", False), ("capacity", 300, "dpfp1", False),
                ("capacity", 100, "favor64", False)]
SEEDS, SEED_STEPS = 5, 300
SEED_THREADS = (1, 2)
SEED_WORKERS = 2


def seed_rows(quick: bool) -> list[dict]:
    """Wall time of SEED_STEPS protocol steps (evaluations included) for one run (train) and
    for SEEDS seeds trained together, each at one and at two torch threads (the machine's two
    cores), best of two: the seeds as one vectorised model in this process (train_seeds), and
    as `train --seeds` trains them on SEED_WORKERS workers (``spread_groups``: seeds 0-2 in this
    process and 3-4 in a worker process, one thread each, ``run_groups_at_once``; the worker
    started and warmed up beforehand, as this process is). The ratio takes the best of each.
    Target: <= 2x."""
    from training.sweep import run_group, run_groups_at_once, spread_groups, worker_pool
    from training.trainer import train
    from training.vectorised import train_seeds

    rows = []
    workers = f"{SEED_WORKERS} processes"
    with worker_pool(SEED_WORKERS - 1) as pool:
        for setting, num_pairs, preset, in_quick in SEED_CONFIGS:
            if quick and not in_quick:
                continue
            config = paper_config(setting, num_pairs, preset).replace(max_steps=SEED_STEPS)
            group = [config.replace(seed=s) for s in range(SEEDS)]
            parts = spread_groups([group], SEED_WORKERS)
            for part in parts[1:]:        # the worker's first steps of this configuration
                pool.submit(run_group, [c.replace(max_steps=2).to_dict() for c in part]).result()
            one, together = {}, {}
            for _ in range(2):
                for threads in SEED_THREADS:
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    alone = train(config, progress=False)
                    one[threads] = min(one.get(threads, math.inf), time.perf_counter() - start)
                    start = time.perf_counter()
                    results = train_seeds(group)
                    together[threads] = min(together.get(threads, math.inf),
                                            time.perf_counter() - start)
                start = time.perf_counter()
                split: list[dict] = []
                run_groups_at_once(parts, split.append, 1, pool)
                together[workers] = min(together.get(workers, math.inf), time.perf_counter() - start)
            torch.set_num_threads(1)
            one_threads, seeds_engine = min(one, key=one.get), min(together, key=together.get)
            ratio = together[seeds_engine] / one[one_threads]
            engine = results[0]["versions"]["engine"]
            stacked = ("stacked" if StackedRetrievalModel.supports([make_model(c) for c in group[:2]])
                       else "vmap")
            how = (f"{engine} ({stacked}), {seeds_engine} thread(s)" if seeds_engine != workers
                   else f"{' + '.join(str(len(p)) for p in parts)} seeds ({stacked}) on {workers}")
            rows.append(dict(config=f"{config.model_label} {setting} S={num_pairs}",
                             one_s=one[one_threads], seeds_s=together[seeds_engine], ratio=ratio,
                             engine=f"{how}; one run {one_threads} thread(s)",
                             one_by_threads=one, seeds_by_threads=together,
                             steps=min(alone["steps"], *(r["steps"] for r in results + split))))
            by_threads = " | ".join(f"{t} thread(s): one {one[t]:5.2f} s, {SEEDS} together "
                                    f"{together[t]:5.2f} s" for t in SEED_THREADS)
            print(f"  {config.model_label:22s} {setting:9s} S={num_pairs:<4d} {by_threads} | "
                  f"{workers}: {together[workers]:5.2f} s ({stacked}) | "
                  f"best {ratio:4.2f}x {verdict(ratio <= SEED_TARGET)}", flush=True)
    return rows


def thread_rows(budget_s: float) -> list[dict]:
    rows = []
    for setting, num_pairs, preset in (("capacity", 600, "linear"), ("overwrite", 200, "dpfp1-delta")):
        config = paper_config(setting, num_pairs, preset)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t = time_paper_config(config, budget_s)
            rows.append(dict(config=f"{config.model_label} S={num_pairs}", threads=threads,
                             step_ms=t["step_wall"] * 1e3, eval_ms=t["eval_wall"] * 1e3))
            print(f"  {config.model_label:22s} S={num_pairs:<4d} threads {threads}: "
                  f"{t['step_wall'] * 1e3:8.2f} ms / step, {t['eval_wall'] * 1e3:8.2f} ms / eval", flush=True)
    torch.set_num_threads(1)
    return rows


def same_machine(t: dict, num_pairs: int, ours: dict) -> dict:
    """The original code's timings on this machine `t` (time_original's) against ours `ours`
    (time_paper_config's): prints a 'here' line, returns its CSV fields."""
    train_100 = t["step_s"] * 100
    ratio = t["step_s"] / ours["step_wall"]
    line = (f"  {'  here, the original code':42s} S={num_pairs:<4d} train {train_100:7.1f} -> "
            f"{ours['step_wall'] * 100:7.3f} s {ratio:7.1f}x {verdict(ratio >= TRAIN_TARGET)}")
    fields = dict(here_original_train_s_per_100=round(train_100, 3),
                  here_train_speedup=round(ratio, 2))
    if t["eval_s"] is not None:
        eval_ratio = t["eval_s"] / ours["eval_wall"]
        line += (f" | eval {t['eval_s']:6.2f} -> {ours['eval_wall']:8.4f} s {eval_ratio:7.1f}x "
                 f"{verdict(eval_ratio >= EVAL_TARGET)}")
        fields.update(here_original_eval_s=round(t["eval_s"], 4),
                      here_eval_speedup=round(eval_ratio, 2))
    print(line, flush=True)
    return fields


def keep_minima(best: dict | None, new: dict) -> dict:
    """Each timing of `new` or of `best` (an earlier pass's), whichever is smaller; a step's
    time also keeps its largest value under "<key>_max" (how much the passes differed)."""
    best = best or {}
    merged = {key: min((t for t in (value, best.get(key)) if t is not None), default=None)
              for key, value in new.items()}
    for key in ("step_wall", "step_s"):
        if key in new:
            merged[f"{key}_max"] = max(new[key], best.get(f"{key}_max", new[key]))
    return merged


def machine_description() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family/model, clock) and the widest vector
    instruction set PyTorch's kernels use here: figures from machines that differ in these are
    not comparable."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break                           # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')}"
        name += f", {float(fields['cpu MHz']):.0f} MHz)" if "cpu MHz" in fields else ")"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset, in about two minutes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.csv"))
    parser.add_argument("--original", metavar="PATH",
                        help="the original code's synthetic/ folder: time it here too")
    parser.add_argument("--passes", type=int, default=1,
                        help="time the paper configurations (and the original) this many times, "
                             "minutes apart, and keep each figure's minimum: for a machine whose "
                             "speed moves in phases of minutes (default 1)")
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passes < 1:
        parser.exit(2, f"bench.py: --passes must be at least 1, got {args.passes}\n")
    if args.rss_child:
        setting, num_pairs, preset, steps = args.rss_child
        return rss_child(setting, int(num_pairs), preset, int(steps))
    try:
        original = check_folder(args.original) if args.original else None
    except OriginalCodeError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        sys.exit(2)

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tune_allocator()                       # as in every training process (training/runtime.py)
    load = os.getloadavg()
    from models.rules.native import kernel_name
    native = kernel_name()               # compiled FWM / delta-rule steps, or their PyTorch forms
    machine = machine_description()
    print(f"# {machine}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} (default {default_threads} threads; measured with 1), load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, steps {native}{'  [QUICK]' if args.quick else ''}")
    print("# wall = minimum over repeats; cpu = process CPU time of the same block")
    print(f"# original figures: {ORIGINAL_MACHINE}; on another CPU the speed-ups against them "
          "are not the same-machine ones (README, Speed)")
    if original is not None:
        print(f"# and the original code timed here, one thread: {original} ('here' rows)")
    budget = 1.0 if args.quick else 2.5
    csv_rows = []

    # Peak memory first: on Linux a child's ru_maxrss starts from the parent's RSS at fork
    # time, so the children must be started while this process is still small.
    print(f"\n## Peak RSS of the largest paper runs, each in its own process (target <= {RSS_TARGET_MB} MB)")
    for row in rss_rows(args.quick):
        csv_rows.append(dict(table="peak rss", config=row["config"], steps=row["steps"],
                             rss_mb=row["rss_mb"], children_max_mb=round(row["children_max_mb"], 1)))

    print("\n## Paper configurations: s / 100 training steps, s / evaluation (original -> ours, speed-up)")
    configs = [row for row in PAPER_CONFIGS if row[-1] or not args.quick]
    if args.passes > 1:
        print(f"# every timing below is the minimum over {args.passes} passes over the configurations; "
              "'passes' gives the slowest pass's training step against the fastest")
    ours_best, here_best = {}, {}
    for number in range(1, args.passes + 1):
        for label, setting, num_pairs, preset, orig_train, orig_eval, _ in configs:
            key = (label, num_pairs)
            t = time_paper_config(paper_config(setting, num_pairs, preset), budget)
            ours_best[key] = keep_minima(ours_best.get(key), t)
            if original is not None:
                here_best[key] = keep_minima(here_best.get(key), time_original(
                    original, setting, num_pairs, preset, budget, orig_eval is not None))
            if number < args.passes:
                print(f"  pass {number}: {label:34s} S={num_pairs:<4d} {t['step_wall'] * 1e3:9.3f} ms / step, "
                      f"{t['eval_wall'] * 1e3:9.3f} ms / eval", flush=True)
    for label, setting, num_pairs, preset, orig_train, orig_eval, _ in configs:
        key = (label, num_pairs)
        t = ours_best[key]
        train_100 = t["step_wall"] * 100
        train_ratio = orig_train / train_100
        spread = t["step_wall_max"] / t["step_wall"]
        line = (f"  {label:42s} S={num_pairs:<4d} train {orig_train:7.1f} -> {train_100:7.3f} s "
                f"(cpu {t['step_cpu'] * 100:7.3f}; sampling {t['sample_wall'] * 100:6.3f}"
                f"{f'; passes {spread:4.2f}x' if args.passes > 1 else ''}) "
                f"{train_ratio:7.1f}x {verdict(train_ratio >= TRAIN_TARGET)}")
        eval_ratio = None
        if orig_eval is not None:
            eval_ratio = orig_eval / t["eval_wall"]
            line += (f" | eval {orig_eval:6.2f} -> {t['eval_wall']:8.4f} s {eval_ratio:7.1f}x "
                     f"{verdict(eval_ratio >= EVAL_TARGET)}")
        print(line, flush=True)
        here = same_machine(here_best[key], num_pairs, t) if original is not None else {}
        csv_rows.append(dict(table="paper", config=f"{label} S={num_pairs}",
                             original_train_s_per_100=orig_train, train_s_per_100=round(train_100, 4),
                             train_cpu_s_per_100=round(t["step_cpu"] * 100, 4),
                             sampling_s_per_100=round(t["sample_wall"] * 100, 4),
                             train_speedup=round(train_ratio, 2),
                             train_target=verdict(train_ratio >= TRAIN_TARGET),
                             original_eval_s=orig_eval, eval_s=round(t["eval_wall"], 5),
                             eval_speedup=None if eval_ratio is None else round(eval_ratio, 2),
                             eval_target=None if eval_ratio is None else verdict(eval_ratio >= EVAL_TARGET),
                             passes=args.passes, train_pass_spread=round(spread, 3),
                             **here))

    print("\n## Delta-rule kernel, fwd + bwd of (o, S_L), fp32, B = 32, d_v = L / 2, ours C = 32")
    for row in kernel_rows(args.quick, 0.6 if args.quick else 1.5):
        csv_rows.append(dict(table="delta kernel", config=f"d_dot={row['d_dot']} L={row['L']} d_v={row['d_v']}",
                             ours_ms=round(row["ours_ms"], 3),
                             loop_ms=None if row["loop_ms"] is None else round(row["loop_ms"], 3),
                             fla_naive_ms=None if row["fla_ms"] is None else round(row["fla_ms"], 3),
                             fla_chunk=row["fla_chunk"], note=row["loop_note"]))

    print(f"\n## {SEEDS} seeds trained together vs one run, {SEED_STEPS} steps of the protocol (target <= {SEED_TARGET}x)")
    for row in seed_rows(args.quick):
        csv_rows.append(dict(table="seeds", config=row["config"], steps=row["steps"],
                             one_run_s=round(row["one_s"], 3), seeds_s=round(row["seeds_s"], 3),
                             seeds_ratio=round(row["ratio"], 2), note=row["engine"],
                             **{f"one_run_s_{t}thr": round(row["one_by_threads"][t], 3)
                                for t in SEED_THREADS},
                             **{f"seeds_s_{t}thr": round(row["seeds_by_threads"][t], 3)
                                for t in SEED_THREADS},
                             **{f"seeds_s_{SEED_WORKERS}proc":
                                round(row["seeds_by_threads"][f"{SEED_WORKERS} processes"], 3)}))

    if not args.quick:
        print("\n## Threads for a single run (wall)")
        for row in thread_rows(budget):
            csv_rows.append(dict(table="threads", config=row["config"], threads=row["threads"],
                                 step_ms=round(row["step_ms"], 3), eval_ms=round(row["eval_ms"], 3)))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = []
    for row in csv_rows:
        fields += [key for key in row if key not in fields]
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["machine", "machine_load", "native_steps"] + fields)
        writer.writeheader()
        for row in csv_rows:
            writer.writerow({"machine": machine, "machine_load": f"{load[0]:.2f}",
                             "native_steps": native, **row})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
