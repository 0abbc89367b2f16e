"""The paper's training protocol (Schlag et al. 2021, Sec. 6.1, and the authors' synthetic/main.py).

Adam (lr 1e-3), batch 32, fresh random sequences every step; every 100 steps an evaluation on 20
freshly sampled sequences with every distinct key queried; stop when the eval loss is <= 1e-3,
after 11 consecutive evaluations without a new best, or at 100k steps. A NaN or inf loss stops
the run as "diverged", keeping its last finite losses. All constants live in RunConfig.

Randomness is explicit: training data, evaluation data, parameter init and random-feature
redraws each get their own stream derived from the run's seed, so a seed gives the same numbers
every time, whatever else ran in the process.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from models.retrieval import RetrievalModel, build_model
from tasks.associative import sample_batch
from tasks.evaluation import aggregate_eval_loss, evaluation_set
from training.config import RunConfig
from training.store import library_versions


def seed_streams(seed: int, count: int = 4) -> list[int]:
    """Independent 63-bit seeds for the run's random streams (numpy SeedSequence)."""
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s) & ((1 << 63) - 1) for s in states]


def make_model(config: RunConfig) -> RetrievalModel:
    """The run's model, initialised from the run's seed without touching global RNG state."""
    init_seed, redraw_seed = seed_streams(config.seed)[2:4]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_model(config.num_pairs, config.feature_map, config.rule, config.d_key,
                            config.d_emb, config.feature_options, config.rule_options)
    model.redraw_generator = torch.Generator().manual_seed(redraw_seed)
    return model


@torch.no_grad()
def evaluate(model: RetrievalModel, config: RunConfig, generator: torch.Generator) -> float:
    """The protocol's evaluation loss on freshly sampled sequences (tasks/evaluation.py)."""
    was_training = model.training
    model.eval()
    batch = evaluation_set(config.setting, config.num_pairs, config.protocol, generator,
                           config.eval_sequences)
    losses = model.query_losses(batch)                                     # [N, Q]
    model.train(was_training)
    return float(aggregate_eval_loss(losses, batch.query_mask, config.protocol, config.batch_size))


def train(config: RunConfig, progress: bool = True, log=None) -> dict:
    """Run one configuration to its stopping point; returns the run's record for the store."""
    config.validate()
    data_seed, eval_seed = seed_streams(config.seed)[:2]
    data_gen = torch.Generator().manual_seed(data_seed)
    eval_gen = torch.Generator().manual_seed(eval_seed)
    model = make_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    curve: list[tuple[int, float, float]] = []
    best, best_step, since_best = math.inf, None, 0
    status, error, solved, step = "done", None, False, 0
    train_losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=config.max_steps, desc=config.model_label + f" S={config.num_pairs}",
               disable=not progress, leave=False, unit="step")
    try:
        for step in range(1, config.max_steps + 1):
            batch = sample_batch(config.setting, config.num_pairs, config.batch_size, data_gen)
            loss = model.loss(batch)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                status = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_losses.append(loss_value)
            if step % config.eval_every and step != config.max_steps:
                continue
            eval_loss = evaluate(model, config, eval_gen)
            train_mean = float(np.mean(train_losses))
            train_losses.clear()
            bar.update(step - bar.n)
            bar.set_postfix(eval=f"{eval_loss:.4g}", best=f"{min(best, eval_loss):.4g}")
            if not math.isfinite(eval_loss):
                status = "diverged"
                break
            curve.append((step, eval_loss, train_mean))
            if eval_loss < best:
                best, best_step, since_best = eval_loss, step, 0
            else:
                since_best += 1
            if log is not None:
                log(f"step {step}: eval {eval_loss:.5g} (best {best:.5g})")
            if eval_loss <= config.stop_loss:
                solved = True
                break
            if since_best >= config.patience:
                break
    except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. out of memory, singular solve
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        bar.close()
    return {
        "run_id": config.run_id,
        "config": config.to_dict(),
        "setting": config.setting,
        "num_pairs": config.num_pairs,
        "feature_map": config.feature_map,
        "rule": config.rule,
        "model": config.model_label,
        "d_dot": model.d_dot,
        "state_size": model.state_size(),
        "protocol": config.protocol,
        "seed": config.seed,
        "status": status,
        "solved": int(solved),
        "best_eval_loss": best if curve else None,
        "final_eval_loss": curve[-1][1] if curve else None,
        "best_step": best_step,
        "steps": step,
        "wall_time_s": time.perf_counter() - start,
        "error": error,
        "versions": library_versions(),
        "curve": curve,
    }


def summary_line(result: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4g}"
    return (f"{result['model']} {result['setting']} S={result['num_pairs']} seed={result['seed']}: "
            f"{result['status']}{' (solved)' if result['solved'] else ''}, best eval loss "
            f"{fmt(result['best_eval_loss'])} at step {result['best_step']}, final "
            f"{fmt(result['final_eval_loss'])}, {result['steps']} steps, "
            f"{result['wall_time_s']:.1f} s [run {result['run_id']}]")
