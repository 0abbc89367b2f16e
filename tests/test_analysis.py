"""Memory limits on runs with known answers, plots on awkward data, and flat exports.

Runs are written by hand (no training) through ResultsStore.put_run, shaped like train()'s
return value, so each statistic is checked against a value worked out in the test.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis import (capacity_table, export_curves, export_runs, load_curves, load_runs,
                      memory_limits)
from analysis.plots import plot_capacity, plot_curves, plot_setting2
from training.config import RunConfig
from training.store import ResultsStore

D_DOT = {"linear": lambda options: 64, "dpfp": lambda options: 128 * options["nu"],
         "softmax": lambda options: None}


def fake_run(S, seed, loss, *, setting="capacity", feature_map="linear", options=None,
             rule="sum", status="done"):
    """A run record as train() returns it, with best eval loss ``loss`` (None: no evaluation)."""
    options = options or {}
    config = RunConfig(setting=setting, num_pairs=S, feature_map=feature_map,
                       feature_options=options, rule=rule, seed=seed)
    d_dot = D_DOT[feature_map](options)
    curve = [] if loss is None else [(100, max(2 * loss, 0.3), 0.3), (200, loss, loss)]
    return {
        "run_id": config.run_id, "config": config.to_dict(), "setting": setting, "num_pairs": S,
        "feature_map": feature_map, "rule": rule, "model": config.model_label, "d_dot": d_dot,
        "state_size": S * (d_dot or 2 * (64 + S)), "protocol": "paper", "seed": seed,
        "status": status, "solved": int(loss is not None and loss <= 1e-3),
        "best_eval_loss": loss, "final_eval_loss": loss, "best_step": None if loss is None else 200,
        "steps": 200, "wall_time_s": 0.1, "versions": {"torch": "test"}, "curve": curve,
    }


def make_store(path, records):
    with ResultsStore(path) as store:
        for record in records:
            store.put_run(record)
    return path


def sweep(losses_by_size, **kwargs):
    """Records for one model: {S: [loss of seed 0, loss of seed 1, ...]}."""
    return [fake_run(S, seed, loss, **kwargs)
            for S, losses in losses_by_size.items() for seed, loss in enumerate(losses)]


def limits_of(tmp_path, records, **options):
    runs = load_runs(make_store(tmp_path / "runs.sqlite", records))
    return memory_limits(runs, **options)


# --- memory limits -----------------------------------------------------------------------
def test_knee_of_a_clean_sweep(tmp_path):
    good, bad = 5e-4, 0.3
    limits = limits_of(tmp_path, sweep({20: [good] * 3, 40: [good] * 3, 60: [bad] * 3, 80: [bad] * 3}))
    row = limits.iloc[0]
    assert (row.model, row.d_dot, row.largest_solved, row.first_failing) == ("Linear sum", 64, 40, 60)
    assert (row.ci_low, row.ci_high) == (40, 40)           # seeds agree: no width
    assert row.limit_per_d_dot == pytest.approx(40 / 64)
    assert row.state_size_at_limit == 40 * 64
    assert (row.min_size, row.max_size, row.sizes, row.seeds, row.solved_above) == (20, 80, 4, 3, 0)


def test_solve_above_the_first_failure_does_not_move_the_knee(tmp_path):
    limits = limits_of(tmp_path, sweep({20: [1e-3], 40: [0.2], 60: [1e-3], 80: [0.3]}))
    row = limits.iloc[0]
    assert (row.largest_solved, row.first_failing, row.solved_above) == (20, 40, 1)


def test_one_seed_gives_a_point_interval(tmp_path):
    limits = limits_of(tmp_path, sweep({20: [1e-3], 40: [5e-3], 60: [0.2]}))
    row = limits.iloc[0]
    assert row.largest_solved == row.ci_low == row.ci_high == 40


def test_disagreeing_seeds_widen_the_interval(tmp_path):
    # At S=40 two seeds solve and one does not: the mean (~0.017) fails, so S* = 20, but
    # resamples that leave out the bad seed solve S=40.
    records = sweep({20: [1e-3] * 3, 40: [1e-3, 1e-3, 0.05], 60: [0.3] * 3})
    row = limits_of(tmp_path, records).iloc[0]
    assert (row.largest_solved, row.first_failing) == (20, 40)
    assert row.ci_low <= row.largest_solved <= row.ci_high
    assert (row.ci_low, row.ci_high) == (20, 40)


def test_interval_is_reproducible_and_independent_of_other_models(tmp_path):
    noisy = sweep({20: [1e-3, 0.05, 1e-3], 40: [1e-3, 1e-3, 0.05], 60: [0.3] * 3})
    other = sweep({20: [1e-3, 0.05], 40: [0.3, 1e-3]}, feature_map="dpfp", options={"nu": 1})
    runs = load_runs(make_store(tmp_path / "both.sqlite", noisy + other))
    alone = memory_limits(runs[runs["model"] == "Linear sum"], n_boot=300, seed=3)
    together = memory_limits(runs, n_boot=300, seed=3)
    again = memory_limits(runs, n_boot=300, seed=3)
    pd.testing.assert_frame_equal(together, again)
    linear = together[together["model"] == "Linear sum"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, linear)


def test_diverged_and_failed_runs_count_as_unsolved(tmp_path):
    records = sweep({20: [1e-3, 1e-3], 40: [1e-3]}) + [
        fake_run(40, 1, 5e-4, status="diverged"),     # low loss before blowing up: still unsolved
        fake_run(60, 0, None, status="failed")]
    row = limits_of(tmp_path, records).iloc[0]
    assert (row.largest_solved, row.first_failing, row.unfinished) == (20, 40, 2)


def test_threshold_is_a_parameter(tmp_path):
    records = sweep({20: [5e-4], 40: [5e-3], 60: [0.2]})
    assert limits_of(tmp_path, records).iloc[0].largest_solved == 40           # default 1e-2
    strict = memory_limits(load_runs(tmp_path / "runs.sqlite"), threshold=1e-3)
    assert strict.iloc[0].largest_solved == 20


def test_nothing_solved_softmax_and_table(tmp_path):
    records = (sweep({20: [0.3], 40: [0.4]})
               + sweep({20: [1e-4], 40: [1e-4]}, feature_map="softmax"))
    limits = limits_of(tmp_path, records)
    linear = limits[limits["model"] == "Linear sum"].iloc[0]
    softmax = limits[limits["model"] == "Softmax"].iloc[0]
    assert (linear.largest_solved, linear.first_failing, linear.ci_high) == (0, 20, 0)
    assert pd.isna(softmax.d_dot) and math.isnan(softmax.limit_per_d_dot)
    assert pd.isna(softmax.first_failing) and softmax.largest_solved == 40
    assert list(limits["model"]) == ["Linear sum", "Softmax"]        # by d_dot, softmax last

    lines = capacity_table(limits).splitlines()
    assert lines[0].startswith("| setting | model | d_dot | S* (largest solved)")
    assert set(lines[1]) <= {"|", "-"} and len(lines) == 4
    assert "| < 20 | [< 20, < 20] | 20 |" in lines[2]
    assert "| - |" in lines[3] and "none up to 40" in lines[3]


def test_empty_runs_give_an_empty_table():
    limits = memory_limits(pd.DataFrame())
    assert limits.empty and "largest_solved" in limits.columns


# --- plots -------------------------------------------------------------------------------
MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def awkward_store(tmp_path_factory):
    """Two models x two settings x two seeds, plus a zero loss, NaN-free diverged and failed runs."""
    records = []
    for setting in ("capacity", "overwrite"):
        records += sweep({20: [1e-3, 2e-3], 40: [0.0, 0.02], 60: [0.3, 0.25]}, setting=setting)
        records += sweep({20: [1e-4, 1e-4], 40: [1e-3, 5e-3], 60: [0.01, 0.05]}, setting=setting,
                         feature_map="dpfp", options={"nu": 1}, rule="delta")
    records += [fake_run(60, 2, None, status="diverged", setting="overwrite"),
                fake_run(40, 2, 0.4, status="diverged", setting="overwrite"),
                fake_run(20, 2, None, status="failed"),
                # a model whose every run diverged: nothing to draw but crosses
                fake_run(20, 0, None, status="diverged", setting="overwrite", feature_map="dpfp",
                         options={"nu": 2}, rule="delta")]
    path = tmp_path_factory.mktemp("plots") / "runs.sqlite"
    return make_store(path, records)


@pytest.mark.parametrize("suffix", [".png", ".pdf"])
@pytest.mark.parametrize("x", ["num_pairs", "state_size", "d_dot_ratio"])
def test_plot_capacity_writes_the_file(awkward_store, tmp_path, suffix, x):
    out = plot_capacity(load_runs(awkward_store), tmp_path / "figures" / f"capacity{suffix}", x=x)
    assert out == tmp_path / "figures" / f"capacity{suffix}"
    assert out.stat().st_size > 1000 and out.read_bytes().startswith(MAGIC[suffix])


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_setting2_and_curves_with_diverged_runs(awkward_store, tmp_path, suffix):
    runs, curves = load_runs(awkward_store), load_curves(awkward_store)
    assert (runs["status"] != "done").sum() == 4
    for out in (plot_setting2(runs, tmp_path / f"setting2{suffix}"),
                plot_curves(curves, tmp_path / f"curves{suffix}", setting="overwrite", num_pairs=40),
                plot_curves(curves, tmp_path / f"all_curves{suffix}")):
        assert out.stat().st_size > 1000 and out.read_bytes().startswith(MAGIC[suffix])


def test_all_runs_diverged_still_draws(tmp_path):
    path = make_store(tmp_path / "bad.sqlite", [fake_run(20, 0, None, status="diverged"),
                                                fake_run(40, 0, math.nan, status="diverged")])
    assert plot_capacity(load_runs(path), tmp_path / "bad.png").stat().st_size > 0


def test_plot_errors_are_clear(awkward_store, tmp_path):
    runs = load_runs(awkward_store)
    with pytest.raises(ValueError, match="suffix"):
        plot_capacity(runs, tmp_path / "figure.jpeg")
    with pytest.raises(ValueError, match="unknown x"):
        plot_capacity(runs, tmp_path / "figure.png", x="steps")
    with pytest.raises(ValueError, match="no runs in setting 'nonsense'"):
        plot_capacity(runs, tmp_path / "figure.png", setting="nonsense")
    with pytest.raises(ValueError, match="no curve points"):
        plot_curves(load_curves(awkward_store), tmp_path / "figure.png", num_pairs=999)


def test_plots_are_exported_lazily_from_the_package():
    from analysis import plots
    assert analysis.plot_capacity is plots.plot_capacity
    with pytest.raises(AttributeError):
        analysis.no_such_function


# --- export ------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["csv", "parquet"])
def test_export_round_trips(awkward_store, tmp_path, format):
    out = export_runs(awkward_store, tmp_path / "export" / f"runs.{format}", format=format)
    back = pd.read_csv(out) if format == "csv" else pd.read_parquet(out)
    runs = load_runs(awkward_store)
    assert sorted(back["run_id"]) == sorted(runs["run_id"])
    assert list(back.columns) == list(runs.columns)
    assert json.loads(back["versions"].iloc[0]) == {"torch": "test"}
    assert json.loads(back["config"].iloc[0])["d_key"] == 64
    merged = runs.merge(back, on="run_id", suffixes=("", "_back"))
    np.testing.assert_allclose(merged["best_eval_loss"], merged["best_eval_loss_back"])


def test_export_format_from_suffix_and_curves(awkward_store, tmp_path):
    out = export_runs(awkward_store, tmp_path / "runs.parquet", format=None)
    assert len(pd.read_parquet(out)) == len(load_runs(awkward_store))
    curves = pd.read_csv(export_curves(awkward_store, tmp_path / "curves.csv"))
    assert len(curves) == len(load_curves(awkward_store))


def test_export_rejects_unknown_formats(awkward_store, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'xlsx'; choose from csv, parquet"):
        export_runs(awkward_store, tmp_path / "runs.xlsx", format="xlsx")
    with pytest.raises(ValueError, match="suffix"):
        export_runs(awkward_store, tmp_path / "runs.json", format=None)
    assert not list(tmp_path.iterdir())
