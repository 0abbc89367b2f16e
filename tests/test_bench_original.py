"""benchmarks/original.py, the harness that times the authors' code on this machine: its
plumbing, against a stand-in synthetic/ folder with the original's interfaces (the original
itself is not part of the repository)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks.original import (MODULES, OriginalCodeError, OriginalRun, check_folder,
                                 time_original)

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = {
    "lib.py": "",
    "associativeRetrievalDataset.py": """
        import numpy as np
        import torch

        class DataLoader:
            def __init__(self, seq_len, n_values, n_keys, replace):
                self.seq_len, self.n_values, self.n_keys = np.int(seq_len), n_values, n_keys
                self.replace = replace

            def _batch(self, count, length):
                k = torch.randint(0, self.n_keys, (count, length))
                v = torch.randint(self.n_keys, self.n_keys + self.n_values, (count, length))
                return torch.stack([k, v], 1), k[:, -1:], v[:, -1:]

            def get_batch(self, batch_size, device):
                return self._batch(batch_size, self.seq_len)

            def get_all_queries(self, device, max_queries=200):
                return self._batch(40, self.seq_len)          # 40 queries: forwards of 32 and 8
        """,
    "linearAttention.py": """
        import torch
        from torch import nn

        class PrefixSumLinearAttentionModel(nn.Module):
            calls = []

            def __init__(self, embedding_size, hidden_size, n_values, n_keys,
                         attention_type='linear', update_rule='sum', eps=1e-6, arg=0):
                super().__init__()
                print("phi size: 64")
                self.n_values = n_values
                self.settings = (attention_type, update_rule, arg, embedding_size, hidden_size)
                self.embeddingV = nn.Embedding(n_values, n_values)
                self.embeddingV.weight = nn.Parameter(torch.eye(n_values), requires_grad=False)
                self.out = nn.Linear(1, n_values)

            def forward(self, x, q):
                self.calls.append((self.training, x.shape[0], x.shape[2]))
                return self.out(q.float())
        """,
    "softmaxAttention.py": """
        import torch
        from torch import nn

        class SoftmaxAttentionModel(nn.Module):
            def __init__(self, embedding_size, hidden_size, n_keys, n_values):
                super().__init__()
                self.n_values = n_values
                self.embeddingV = nn.Embedding(n_values, n_values)
                self.embeddingV.weight = nn.Parameter(torch.eye(n_values), requires_grad=False)
                self.out = nn.Linear(1, n_values)

            def forward(self, x, q):
                return self.out(q.float())
        """,
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    for name, source in STAND_IN.items():
        (folder / name).write_text(textwrap.dedent(source))
    monkeypatch.setattr(sys, "path", list(sys.path))         # the harness prepends the folder
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name[:-3], raising=False)
    yield folder
    for name in MODULES:
        sys.modules.pop(name[:-3], None)


def test_a_folder_without_the_original_modules_is_refused(tmp_path):
    (tmp_path / "lib.py").write_text("")
    with pytest.raises(OriginalCodeError, match="linearAttention.py"):
        check_folder(tmp_path)
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--original",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not the original code" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_runs_are_built_as_the_original_main_builds_them(stand_in):
    had_int = "int" in vars(np)
    run = OriginalRun(stand_in, "overwrite", 20, "schlag2021-tanh")
    assert run.model.settings == ("tanh", "fwm", 0, 44, 64)
    assert (run.batch_size, run.optimizer.defaults["lr"]) == (128, 1e-4)
    assert run.loader.seq_len == 40 and run.loader.replace
    run = OriginalRun(stand_in, "capacity", 100, "dpfp3")
    assert run.model.settings == ("dpfp", "sum", 3, 220, 64)
    assert (run.batch_size, run.optimizer.defaults["lr"]) == (32, 1e-3)
    assert run.loader.seq_len == 100 and not run.loader.replace
    assert ("int" in vars(np)) == had_int          # numpy's namespace is left as it was
    with pytest.raises(OriginalCodeError, match="no original counterpart"):
        OriginalRun(stand_in, "capacity", 100, "taylor")


def test_a_step_trains_and_an_evaluation_splits_into_training_batches(stand_in):
    run = OriginalRun(stand_in, "capacity", 10, "linear")
    from linearAttention import PrefixSumLinearAttentionModel     # the stand-in's, now on the path

    before = run.model.out.weight.detach().clone()
    PrefixSumLinearAttentionModel.calls.clear()
    run.step()
    assert PrefixSumLinearAttentionModel.calls == [(True, 32, 10)]
    assert not np.allclose(before, run.model.out.weight.detach())     # Adam stepped
    PrefixSumLinearAttentionModel.calls.clear()
    assert np.isfinite(run.evaluate())
    assert PrefixSumLinearAttentionModel.calls == [(False, 32, 10), (False, 8, 10)] * 20
    timings = time_original(stand_in, "capacity", 10, "softmax", budget_s=0.05)
    assert timings["step_s"] > 0 and timings["eval_s"] > 0
    assert time_original(stand_in, "capacity", 10, "linear", 0.05, evaluate=False)["eval_s"] is None


def test_a_second_folder_replaces_the_first_ones_modules(stand_in, tmp_path):
    OriginalRun(stand_in, "capacity", 10, "linear")
    other = tmp_path / "other" / "synthetic"
    other.mkdir(parents=True)
    for path in stand_in.iterdir():
        (other / path.name).write_text(path.read_text())
    OriginalRun(other, "capacity", 10, "linear")
    import linearAttention
    assert Path(linearAttention.__file__).parent == other


def test_passes_keep_each_timings_minimum_and_the_slowest_step():
    """bench.py --passes: a figure is its minimum over the passes; the step's slowest pass is
    kept beside it; an evaluation not timed (None) stays None; fewer than one pass is refused."""
    from benchmarks.bench import keep_minima

    first = dict(step_wall=2.0, step_cpu=1.9, eval_wall=0.5)
    best = keep_minima(None, first)
    assert best == dict(step_wall=2.0, step_cpu=1.9, eval_wall=0.5, step_wall_max=2.0)
    best = keep_minima(best, dict(step_wall=1.5, step_cpu=2.1, eval_wall=0.7))
    assert best == dict(step_wall=1.5, step_cpu=1.9, eval_wall=0.5, step_wall_max=2.0)
    here = keep_minima(keep_minima(None, dict(step_s=3.0, eval_s=None)), dict(step_s=4.0, eval_s=None))
    assert here == dict(step_s=3.0, eval_s=None, step_s_max=4.0)
    result = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--passes", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--passes must be at least 1" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
