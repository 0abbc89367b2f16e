import pytest
import torch

from tasks.mqar import IGNORE, mqar_batch, power_law_gaps


def check_layout(batch, N, V):
    for inputs, labels in zip(batch.inputs.tolist(), batch.labels.tolist()):
        keys, values = inputs[0:2 * N:2], inputs[1:2 * N:2]
        assert len(set(keys)) == N and len(set(values)) == N
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        answer = dict(zip(keys, values))
        queried = [(t, inputs[t], labels[t]) for t in range(len(inputs)) if labels[t] != IGNORE]
        assert sorted(k for _, k, _ in queried) == sorted(keys)       # every key queried once
        for t, key, value in queried:
            assert t >= 2 * N and (t - 2 * N) % 2 == 0 and value == answer[key]


@pytest.mark.parametrize("filler", ["noise", "vocab", "zero"])
def test_layout_matches_zoology(filler, generator):
    N, V, T = 8, 128, 64
    batch = mqar_batch(50, N, generator, vocab_size=V, seq_len=T, filler=filler, noise_vocab_size=16)
    assert batch.inputs.shape == batch.labels.shape == (50, T)
    check_layout(batch, N, V)
    region = batch.inputs[:, 2 * N:][batch.labels[:, 2 * N:] == IGNORE]
    if filler == "noise":   # filler never collides with keys or values
        assert (region >= V).all() and batch.vocab_size == V + 16
    elif filler == "zero":
        assert (region == 0).all() and batch.vocab_size == V
    else:
        assert (region < V).all() and batch.vocab_size == V


def test_same_seed_same_batch():
    a = mqar_batch(4, 4, torch.Generator().manual_seed(3), vocab_size=64, seq_len=32)
    b = mqar_batch(4, 4, torch.Generator().manual_seed(3), vocab_size=64, seq_len=32)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


def test_power_law_favours_short_gaps(generator):
    gaps = power_law_gaps(4000, 50, 1, 0.01, generator).flatten()
    uniform = power_law_gaps(4000, 50, 1, 1.0, generator).flatten()
    assert (gaps < 5).float().mean() > 0.4 > (uniform < 5).float().mean()


def test_bad_knobs_raise(generator):
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar_batch(2, 20, generator, seq_len=64)
    with pytest.raises(ValueError, match="filler"):
        mqar_batch(2, 4, generator, filler="random")


def test_mqar_model_state_size_and_trainable(generator):
    from models.mqar import build_mqar_model
    model = build_mqar_model(160, "dpfp", "delta", d_key=16, feature_options={"nu": 1})
    assert model.state_size() == (2 * 16) * 160          # d_dot x vocabulary
    assert build_mqar_model(160, "linear", "sum", d_key=8).state_size() == 8 * 160
    batch = mqar_batch(4, 4, generator, vocab_size=128, seq_len=32, noise_vocab_size=32)
    model.loss(batch).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mqar_training_end_to_end_with_per_slice_accuracy():
    from training.config import RunConfig
    from training.trainer import train
    base = dict(setting="mqar", num_pairs=4, max_steps=300, d_key=32,
                task_options={"seq_len": 32, "eval_pairs": [2, 4, 8], "eval_examples": 64})
    softmax = train(RunConfig(feature_map="softmax", **base), progress=False)
    assert softmax["status"] == "done"
    assert softmax["metrics"]["best_accuracy/num_kv_pairs=4"] > 0.9       # softmax recalls
    small = train(RunConfig(feature_map="linear", **{**base, "d_key": 4}), progress=False)
    # a 4-dimensional linear memory holding 8 pairs must do worse than with 2 pairs
    assert (small["metrics"]["best_accuracy/num_kv_pairs=8"]
            < small["metrics"]["best_accuracy/num_kv_pairs=2"])


def test_mqar_preset_and_recall_plot(tmp_path):
    from analysis import load_runs, plot_recall
    from training.store import ResultsStore
    from training.sweep import preset_sweep, run_sweep, Sweep
    sweep = preset_sweep("mqar")
    assert {c.setting for c in sweep.runs} == {"mqar"} and len(sweep.runs) == 8 * 3
    tiny = [c.replace(max_steps=40, eval_every=20,
                      task_options={"seq_len": 32, "eval_pairs": [2, 4], "eval_examples": 16})
            for c in sweep.runs if c.num_pairs == 4 and c.d_key in (8, 16)]
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as store:
        run_sweep(Sweep("tiny-mqar", tiny), store, workers=1, progress=False)
    runs = load_runs(path)
    assert "best_accuracy/num_kv_pairs=2" in runs.columns
    out = plot_recall(runs, tmp_path / "recall.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
