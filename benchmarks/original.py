"""The authors' code timed on this machine, for same-machine speed-ups (``bench.py --original``).

The original code (ischlag/fast-weight-transformers, its ``synthetic/`` folder) is not part of
this repository: clone it and pass the folder,

    python benchmarks/bench.py --original ~/fast-weight-transformers/synthetic

Its modules are imported as they are, from that folder. Its vocabulary builder calls ``np.int``,
which numpy 1.24 removed: the name is given back as ``int`` while a data loader is built, and
taken away again. A training step is what its ``main.train`` runs per step (a batch from
``DataLoader.get_batch``, the forward, the one-hot target, the loss, zero_grad, backward, Adam);
an evaluation is its 20 sequences from ``get_all_queries``, each split into forwards of at most
the training batch size. Its own timers leave the data out; these include it, as bench.py's
steps include ``sample_batch``. Its settings are ``main.run``'s: embedding size int(2.2 S), d = 64,
sequence length S (capacity) or 2 S with replacement (overwrite), and for the tanh FWM batch 128
and learning rate 1e-4.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODULES = ("associativeRetrievalDataset.py", "linearAttention.py", "softmaxAttention.py", "lib.py")
# Our model presets as the original's (attn_name, attn_arg, update_rule); softmax is its own model.
ORIGINAL_MODELS = {
    "linear": ("linear", 0, "sum"),
    "dpfp3": ("dpfp", 3, "sum"),
    "favor512": ("favor", 512, "sum"),
    "dpfp1-delta": ("dpfp", 1, "ours"),
    "dpfp2-delta": ("dpfp", 2, "ours"),
    "schlag2021-tanh": ("tanh", 0, "fwm"),
    "softmax": None,
}
EVAL_SEQUENCES = 20          # main.run's test_sequences
HIDDEN_SIZE = 64


class OriginalCodeError(ValueError):
    """The folder given is not the original code's synthetic/ folder."""


def check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    missing = [name for name in MODULES if not (folder / name).is_file()]
    if missing:
        raise OriginalCodeError(f"--original {path}: not the original code's synthetic/ folder "
                                f"(missing {', '.join(missing)})")
    return folder


@contextlib.contextmanager
def _numpy_int():
    """np.int as the original's numpy had it (an alias of int), for the duration."""
    had = "int" in vars(np)
    if not had:
        np.int = int
    try:
        yield
    finally:
        if not had:
            del np.int


class OriginalRun:
    """One configuration of the original code, built as its main.run builds it."""

    def __init__(self, folder: Path, setting: str, num_pairs: int, preset: str, seed: int = 1):
        if preset not in ORIGINAL_MODELS:
            raise OriginalCodeError(f"no original counterpart for preset {preset!r}")
        for name in MODULES:                 # imported from another folder before: not those
            module = sys.modules.get(name[:-3])
            if module is not None and Path(getattr(module, "__file__", "")).parent != folder:
                del sys.modules[name[:-3]]
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        sys.path.insert(0, str(folder))
        from associativeRetrievalDataset import DataLoader
        from linearAttention import PrefixSumLinearAttentionModel
        from softmaxAttention import SoftmaxAttentionModel

        torch.manual_seed(seed)
        np.random.seed(seed)
        replace = setting == "overwrite"
        S = num_pairs
        with _numpy_int():
            self.loader = DataLoader(seq_len=2 * S if replace else S, n_values=S, n_keys=S,
                                     replace=replace)
        embedding_size = int((S + S) * 1.1)
        with contextlib.redirect_stdout(io.StringIO()):          # it prints the phi size
            if ORIGINAL_MODELS[preset] is None:
                self.model = SoftmaxAttentionModel(embedding_size=embedding_size,
                                                   hidden_size=HIDDEN_SIZE, n_values=S, n_keys=S)
            else:
                attn_name, attn_arg, update_rule = ORIGINAL_MODELS[preset]
                self.model = PrefixSumLinearAttentionModel(
                    embedding_size=embedding_size, hidden_size=HIDDEN_SIZE, n_values=S, n_keys=S,
                    attention_type=attn_name, update_rule=update_rule, arg=attn_arg)
        fwm = ORIGINAL_MODELS[preset] == ("tanh", 0, "fwm")
        self.batch_size = 128 if fwm else 32
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4 if fwm else 1e-3)

    def _loss(self, x, q, y):
        y_hat = self.model(x, q)                                           # [B, S]
        with torch.no_grad():
            target = self.model.embeddingV(y - self.model.n_values).squeeze(1)
        return (0.5 * (target - y_hat).pow(2)).sum(dim=-1).mean()

    def step(self) -> None:
        self.model.train()
        x, q, y = self.loader.get_batch(self.batch_size, "cpu")
        loss = self._loss(x, q, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for _ in range(EVAL_SEQUENCES):
            x, q, y = self.loader.get_all_queries("cpu")
            for xs, qs, ys in zip(x.split(self.batch_size), q.split(self.batch_size),
                                  y.split(self.batch_size)):
                losses.append(float(self._loss(xs, qs, ys)))
        return float(np.mean(losses))


def time_original(folder: Path, setting: str, num_pairs: int, preset: str, budget_s: float,
                  evaluate: bool = True) -> dict:
    """Wall seconds per training step (the minimum over two blocks after one warm-up step) and
    per evaluation (the minimum of two, or one where an evaluation takes over budget_s / 2)."""
    run = OriginalRun(folder, setting, num_pairs, preset)
    start = time.perf_counter()
    run.step()
    once = time.perf_counter() - start
    calls = max(1, int(budget_s / 2 / once))
    step_s = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(calls):
            run.step()
        step_s = min(step_s, (time.perf_counter() - start) / calls)
    eval_s = None
    if evaluate:
        for _ in range(2):
            start = time.perf_counter()
            run.evaluate()
            elapsed = time.perf_counter() - start
            eval_s = elapsed if eval_s is None else min(eval_s, elapsed)
            if elapsed > budget_s / 2:
                break
    return dict(step_s=step_s, eval_s=eval_s)
