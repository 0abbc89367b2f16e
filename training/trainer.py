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
from torch import Tensor
from tqdm.auto import tqdm

from models.retrieval import build_model, retrieval_losses
from tasks.associative import sample_batch
from tasks.mqar import mqar_batch, mqar_eval_set, total_vocab_size
from tasks.evaluation import aggregate_eval_loss, evaluation_set
from training.adam import LeanAdam
from training.config import RunConfig
from training.store import library_versions


def seed_streams(seed: int, count: int = 4) -> list[int]:
    """Independent 63-bit seeds for the run's random streams (numpy SeedSequence)."""
    states = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s) & ((1 << 63) - 1) for s in states]


def make_model(config: RunConfig) -> torch.nn.Module:
    """The run's model, initialised from the run's seed without touching global RNG state."""
    return make_task(config).build_model()


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: RunConfig, generator: torch.Generator) -> float:
    """The protocol's evaluation loss on freshly sampled sequences (tasks/evaluation.py)."""
    return make_task(config).evaluate(model, generator)[0]


class RetrievalTask:
    """The paper's capacity / overwrite settings: squared loss, protocol-specific evaluation."""

    def __init__(self, config: RunConfig):
        self.config = config

    def _build(self):
        c = self.config
        return build_model(c.num_pairs, c.feature_map, c.rule, c.d_key, c.d_emb,
                           c.feature_options, c.rule_options)

    def check(self) -> None:
        self.check_model(self._build())

    def check_model(self, model) -> None:
        """The feature map must honour its contract (docs/feature_maps.md) before training."""
        from models.feature_maps import check_feature_map
        memory = model.memory
        if hasattr(memory, "phi"):
            check_feature_map(memory.phi, self.config.d_key,
                              needs_nonnegative=memory.rule.key_norm == "sum")

    def build_model(self) -> torch.nn.Module:
        init_seed, redraw_seed = seed_streams(self.config.seed)[2:4]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = self._build()
        model.redraw_generator = torch.Generator().manual_seed(redraw_seed)
        return model

    def train_batch(self, generator: torch.Generator):
        c = self.config
        return sample_batch(c.setting, c.num_pairs, c.batch_size, generator)

    def eval_batch(self, generator: torch.Generator):
        c = self.config
        return evaluation_set(c.setting, c.num_pairs, c.protocol, generator, c.eval_sequences)

    def score(self, y: Tensor, batch) -> tuple[float, dict]:
        """The protocol's eval loss and metrics from the model's answers y [N, Q, S]."""
        c = self.config
        losses = retrieval_losses(y, batch)                                    # [N, Q]
        loss = aggregate_eval_loss(losses, batch.query_mask, c.protocol, c.batch_size)
        correct = (y.argmax(-1) == batch.targets)[batch.query_mask]
        return float(loss), {"accuracy": float(correct.float().mean())}

    @torch.no_grad()
    def evaluate(self, model, generator: torch.Generator) -> tuple[float, dict]:
        was_training = model.training
        model.eval()
        batch = self.eval_batch(generator)
        y = model(batch)                                                       # [N, Q, S]
        model.train(was_training)
        return self.score(y, batch)


class MQARTask(RetrievalTask):
    """Zoology's multi-query associative recall (tasks/mqar.py) with the same loss and protocol;
    evaluation reports accuracy per slice (number of pairs)."""

    # Laptop-sized defaults (Zoology's figures use vocab 8192, seq_len 64..512).
    DEFAULTS = {"vocab_size": 128, "seq_len": 64, "power_a": 0.01, "filler": "noise",
                "noise_vocab_size": 32, "eval_pairs": None, "eval_examples": 128}

    def __init__(self, config: RunConfig):
        super().__init__(config)
        unknown = sorted(set(config.task_options) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"unknown mqar task option(s): {', '.join(unknown)}; "
                             f"choose from {', '.join(self.DEFAULTS)}")
        options = {**self.DEFAULTS, **config.task_options}
        eval_pairs = options.pop("eval_pairs") or [config.num_pairs]
        if not isinstance(eval_pairs, list) or not all(_positive_int(n) for n in eval_pairs):
            raise ValueError(f"mqar eval_pairs must be a list of positive integers, got {eval_pairs!r}")
        for name in ("vocab_size", "seq_len", "noise_vocab_size", "eval_examples"):
            if not _positive_int(options[name]):
                raise ValueError(f"mqar {name} must be a positive integer, got {options[name]!r}")
        power_a = options["power_a"]
        if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or not power_a > 0:
            raise ValueError(f"mqar power_a must be a number > 0, got {power_a!r}")
        self.eval_pairs = eval_pairs
        self.eval_examples = options.pop("eval_examples")
        self.options = options

    def _build(self):
        from models.mqar import build_mqar_model
        c = self.config
        vocab = total_vocab_size(self.options["vocab_size"], self.options["filler"],
                                 self.options["noise_vocab_size"])
        model = build_mqar_model(vocab, c.feature_map, c.rule, c.d_key, c.d_emb,
                                 c.feature_options, c.rule_options)
        model.context_length = self.options["seq_len"]
        return model

    def check(self) -> None:
        for pairs in {self.config.num_pairs, *self.eval_pairs}:
            mqar_batch(1, pairs, torch.Generator().manual_seed(0), **self.options)
        self.check_model(self._build())

    def train_batch(self, generator: torch.Generator):
        return mqar_batch(self.config.batch_size, self.config.num_pairs, generator, **self.options)

    @torch.no_grad()
    def evaluate(self, model, generator: torch.Generator) -> tuple[float, dict]:
        was_training = model.training
        model.eval()
        total_loss, total_queries, metrics = 0.0, 0, {}
        for batch in mqar_eval_set(self.eval_pairs, self.eval_examples, generator, **self.options):
            losses, correct = model.query_losses_and_hits(batch)
            total_loss += float(losses.sum())
            total_queries += losses.numel()
            metrics[f"accuracy/num_kv_pairs={int(batch.num_kv_pairs[0])}"] = float(correct.float().mean())
        model.train(was_training)
        metrics["accuracy"] = float(np.mean(list(metrics.values())))
        return total_loss / total_queries, metrics


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def make_task(config: RunConfig):
    return MQARTask(config) if config.setting == "mqar" else RetrievalTask(config)


def make_optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam with PyTorch's defaults (the paper's optimiser); the fused kernel where available
    (same update, fewer passes over memory), called directly by ``LeanAdam`` (training/adam.py:
    the floats of torch.optim.Adam(fused=True) without its per-step bookkeeping)."""
    parameters = list(parameters)
    try:
        return LeanAdam(parameters, lr=lr)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(parameters, lr=lr)


def native_steps_used(config: RunConfig) -> dict:
    """For models with compiled steps (the FWM write, the delta rule's training answers, DPFP's
    and FAVOR+'s kernels in the sum rule's attention form, the ELU + 1 and tanh feature maps),
    which form ran them: "native" or "torch" (they round differently; models/rules/native.py).
    Runs train on the CPU in float32."""
    if (config.rule not in ("fwm", "delta") and config.feature_map not in ("linear", "tanh")
            and not (config.rule == "sum" and config.feature_map in ("dpfp", "favor"))):
        return {}
    from models.rules.native import kernel_name
    return {"native_steps": kernel_name()}


class RunRecord:
    """One run's bookkeeping under the protocol: curve, best, patience, stop and status."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.curve: list[tuple[int, float, float]] = []
        self.best, self.best_step, self.since_best = math.inf, None, 0
        self.metrics, self.best_metrics = {}, {}
        self.status, self.error, self.solved, self.steps = "done", None, False, 0
        self.train_losses: list[float] = []
        self.stopped = False
        self.start = time.perf_counter()
        self.wall_time = None
        # Read when the run starts: HEAD may move while a long run trains with the code it loaded.
        self.versions = {**library_versions(), **native_steps_used(config)}

    def train_step(self, step: int, loss: float) -> None:
        """Record a training loss; a NaN or inf stops the run as diverged."""
        self.steps = step
        if not math.isfinite(loss):
            self.stop("diverged")
        else:
            self.train_losses.append(loss)

    def eval_due(self, step: int) -> bool:
        return step % self.config.eval_every == 0 or step == self.config.max_steps

    def evaluation(self, step: int, eval_loss: float, metrics: dict) -> None:
        """Record an evaluation and apply the stopping rules."""
        if not math.isfinite(eval_loss):
            return self.stop("diverged")
        self.curve.append((step, eval_loss, float(np.mean(self.train_losses)) if self.train_losses else math.nan))
        self.train_losses = []
        self.metrics = metrics
        if eval_loss < self.best:
            self.best, self.best_step, self.since_best, self.best_metrics = eval_loss, step, 0, metrics
        else:
            self.since_best += 1
        if eval_loss <= self.config.stop_loss:
            self.solved = True
            self.stop("done")
        elif self.since_best >= self.config.patience or step >= self.config.max_steps:
            self.stop("done")

    def stop(self, status: str, error: str | None = None) -> None:
        if not self.stopped:
            self.status, self.error, self.stopped = status, error, True
            self.wall_time = time.perf_counter() - self.start

    def result(self, model, engine: str = "sequential") -> dict:
        self.stop(self.status)
        config = self.config
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
            "status": self.status,
            "solved": int(self.solved),
            "best_eval_loss": self.best if self.curve else None,
            "final_eval_loss": self.curve[-1][1] if self.curve else None,
            "best_step": self.best_step,
            "steps": self.steps,
            "wall_time_s": self.wall_time,
            "error": self.error,
            # metrics at the best evaluation (best_*) and at the last one (final_*)
            "metrics": {**{f"best_{k}": v for k, v in self.best_metrics.items()},
                        **{f"final_{k}": v for k, v in self.metrics.items()}},
            "versions": {**self.versions, "engine": engine},
            "curve": self.curve,
        }


class _Unbuilt:
    """Stands in for a model that could not be built, for the run's record."""
    d_dot = None

    def state_size(self):
        return None


def train(config: RunConfig, progress: bool = True, log=None) -> dict:
    """Run one configuration to its stopping point; returns the run's record for the store."""
    config.validate()
    task = make_task(config)
    data_seed, eval_seed = seed_streams(config.seed)[:2]
    data_gen = torch.Generator().manual_seed(data_seed)
    eval_gen = torch.Generator().manual_seed(eval_seed)
    record = RunRecord(config)
    try:
        model = task.build_model()
    except (RuntimeError, MemoryError) as exc:       # e.g. out of memory for a huge S
        record.stop("failed", f"{type(exc).__name__}: {exc}")
        return record.result(_Unbuilt())
    optimizer = make_optimizer(model.parameters(), config.lr)
    bar = tqdm(total=config.max_steps, desc=config.model_label + f" S={config.num_pairs}",
               disable=not progress, leave=False, unit="step")
    try:
        for step in range(1, config.max_steps + 1):
            loss = model.loss(task.train_batch(data_gen))
            record.train_step(step, loss.item())
            if record.stopped:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not record.eval_due(step):
                continue
            eval_loss, metrics = task.evaluate(model, eval_gen)
            record.evaluation(step, eval_loss, metrics)
            bar.update(step - bar.n)
            bar.set_postfix(eval=f"{eval_loss:.4g}", best=f"{record.best:.4g}")
            if log is not None:
                log(f"step {step}: eval {eval_loss:.5g} (best {record.best:.5g})")
            if record.stopped:
                break
    except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. out of memory, singular solve
        record.stop("failed", f"{type(exc).__name__}: {exc}")
    finally:
        bar.close()
    return record.result(model)


def summary_line(result: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4g}"
    return (f"{result['model']} {result['setting']} S={result['num_pairs']} seed={result['seed']}: "
            f"{result['status']}{' (solved)' if result['solved'] else ''}, best eval loss "
            f"{fmt(result['best_eval_loss'])} at step {result['best_step']}, final "
            f"{fmt(result['final_eval_loss'])}, {result['steps']} steps, "
            f"{result['wall_time_s']:.1f} s [run {result['run_id']}]")
