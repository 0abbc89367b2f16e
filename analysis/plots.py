"""The paper's figures from the tidy tables of analysis.results, with seeds and d_dot marked.

- ``plot_capacity``: Figure 2 of Schlag et al. 2021 (arXiv 2102.11174): best eval loss against
  S (or state size, or S / d_dot), one line per model, a 95% confidence band over seeds, each
  model's d_dot as a dotted vertical line in its colour.
- ``plot_curves``: Figure 3: eval loss against training step, one colour per model (one line
  per run, so seeds that stop early do not bias a mean).
- ``plot_setting2``: the appendix's loss against S for the update rules in the overwrite setting.

Every function draws on its own ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state: safe
headless, in threads and in notebooks), saves it in the format its file suffix names (.png,
.pdf, .svg) and returns the path. Losses live on a log axis: zeros are clipped to the axis
floor; diverged and failed runs are left out of the lines and marked with a cross at the top of
the plot, at their x, so they are visible but cannot distort the bands.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from analysis.limits import DEFAULT_THRESHOLD

FORMATS = (".png", ".pdf", ".svg")
X_AXES = {
    "num_pairs": "number of key-value pairs S",
    "state_size": "state size (floats in the memory of one sequence)",
    "d_dot_ratio": "S / d_dot",
}
ZERO_OUTPUT_LOSS = 0.5   # 0.5 |0 - v|^2 for a one-hot v: the plateau of a memory that gave up


def model_palette(models) -> dict:
    """A colour per model name, stable for a given set of names (sorted, then coloured)."""
    names = sorted(set(models))
    colours = sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))
    return dict(zip(names, colours))


def _new_figure(size=(7.5, 4.5)):
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure: Figure, out) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot tell the figure format from {out.name!r}: "
                         f"use a suffix among {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=150, bbox_inches="tight")
    return out


def _log_floor(losses: pd.Series, line: float | None = None) -> float:
    """Bottom of the log loss axis: half the smallest positive loss or reference line, so the
    line is visible and zero losses (clipped to the floor) sit on the axis."""
    positive = losses[np.isfinite(losses) & (losses > 0)]
    candidates = [float(positive.min())] if len(positive) else [1e-3]
    if line is not None:
        candidates.append(line)
    return max(min(candidates) / 2, 1e-8)


def _loss_axis(ax, losses: pd.Series, floor: float, threshold: float | None) -> list:
    """Log y axis from the floor to above the largest loss, with reference lines; legend handles."""
    top = max(float(losses.max()) if len(losses) else 0.0, ZERO_OUTPUT_LOSS) * 1.6
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    ax.axhline(ZERO_OUTPUT_LOSS, color="0.6", lw=0.8, ls="--")
    handles = [Line2D([], [], color="0.6", lw=0.8, ls="--", label="zero output (0.5)")]
    if threshold is not None:
        ax.axhline(threshold, color="0.3", lw=0.8, ls="-.")
        handles.append(Line2D([], [], color="0.3", lw=0.8, ls="-.", label=f"threshold {threshold:g}"))
    return handles


def _mark_unfinished(ax, x: pd.Series, colours: list, handles: list) -> None:
    """Crosses at the top of the axes (x in data units) for runs that diverged or failed."""
    if len(x) == 0:
        return
    ax.scatter(x, np.full(len(x), 0.97), transform=ax.get_xaxis_transform(), marker="x",
               color=colours, s=40, zorder=5, clip_on=False)
    handles.append(Line2D([], [], color="0.2", marker="x", ls="", label=f"diverged / failed ({len(x)})"))


def _legend(ax, handles: list) -> None:
    """One legend outside the axes: seaborn's entries (models, styles), then ours."""
    seaborn_legend = ax.get_legend()
    existing, labels = [], []
    if seaborn_legend is not None:
        existing = list(seaborn_legend.legend_handles)
        labels = [text.get_text() for text in seaborn_legend.texts]
    ax.legend(handles=existing + handles, labels=labels + [h.get_label() for h in handles],
              loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize="small")


def plot_capacity(runs: pd.DataFrame, out, x: str = "num_pairs", setting: str = "capacity",
                  style: str | None = None, threshold: float | None = DEFAULT_THRESHOLD,
                  errorbar=("ci", 95), seed: int = 0, title: str | None = None) -> Path:
    """Best eval loss against ``x`` for every model of ``setting`` (Figure 2 style).

    x: "num_pairs" (S), "state_size" (floats in the memory: compares memories of different
    widths at equal cost; log x axis) or "d_dot_ratio" (S / d_dot: the claimed limit is at 1;
    models without d_dot, i.e. softmax, are left out). With several seeds per point the line is
    their mean and the band seaborn's bootstrap 95% confidence interval (``errorbar``, seeded).
    ``style``: a column whose values get different dash patterns (e.g. "rule").
    ``threshold``: draw the "solved" loss of ``memory_limits`` (None: no line).
    Pass runs of a single protocol: runs are grouped by model label only.
    """
    if x not in X_AXES:
        raise ValueError(f"unknown x {x!r}; choose from {', '.join(X_AXES)}")
    data = runs[runs["setting"] == setting].copy()
    if data.empty:
        available = ", ".join(sorted(runs["setting"].unique())) if len(runs) else "none"
        raise ValueError(f"no runs in setting {setting!r} (settings in these runs: {available})")
    data["d_dot"] = data["d_dot"].astype(float)
    data["d_dot_ratio"] = data["num_pairs"] / data["d_dot"]        # NaN for softmax
    data = data[np.isfinite(data[x])]
    palette = model_palette(data["model"])

    loss = data["best_eval_loss"].astype(float)
    finished = (data["status"] == "done") & np.isfinite(loss)
    floor = _log_floor(loss[finished], threshold)
    good = data[finished].assign(best_eval_loss=loss[finished].clip(lower=floor))
    bad = data[~finished]

    figure, ax = _new_figure()
    if not good.empty:
        sns.lineplot(data=good, x=x, y="best_eval_loss", hue="model", style=style, palette=palette,
                     hue_order=sorted(good["model"].unique()), marker="o", markersize=4,
                     errorbar=errorbar, n_boot=1000, seed=seed, ax=ax)
    handles = _loss_axis(ax, good["best_eval_loss"], floor, threshold)
    # Models with no finished run have no line, hence no seaborn legend entry: name them here.
    handles += [Line2D([], [], color=palette[model], marker="x", ls="", label=f"{model}: no finished run")
                for model in sorted(set(data["model"]) - set(good["model"]))]
    _mark_d_dot(ax, data, x, palette, handles)
    _mark_unfinished(ax, bad[x], [palette[m] for m in bad["model"]], handles)
    if x == "state_size":
        ax.set_xscale("log")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("best eval loss")
    ax.set_title(title or f"{setting}: best eval loss per run")
    _legend(ax, handles)
    return _save(figure, out)


def _mark_d_dot(ax, data: pd.DataFrame, x: str, palette: dict, handles: list) -> None:
    """Dotted vertical lines where S = d_dot, in each model's colour."""
    with_d_dot = data.dropna(subset=["d_dot"])
    if with_d_dot.empty:
        return
    if x == "d_dot_ratio":
        ax.axvline(1.0, color="0.2", ls=":", lw=1)
    else:
        for model, group in with_d_dot.groupby("model"):
            d_dot = group["d_dot"].iloc[0]
            # A fast weight memory holds a fixed number of floats per pair (S x d_dot in all),
            # so the state size at S = d_dot scales from any swept S.
            at = d_dot if x == "num_pairs" else d_dot * float((group["state_size"] / group["num_pairs"]).median())
            ax.axvline(at, color=palette[model], ls=":", lw=1.2)
    handles.append(Line2D([], [], color="0.2", ls=":", lw=1.2, label="S = d_dot"))


def plot_setting2(runs: pd.DataFrame, out, x: str = "num_pairs", **options) -> Path:
    """Best eval loss against S for every model of the overwrite setting (update rules dashed
    differently); options as ``plot_capacity``."""
    options.setdefault("title", "overwrite: best eval loss per run, by update rule")
    return plot_capacity(runs, out, x=x, setting="overwrite", style="rule", **options)


def plot_curves(curves: pd.DataFrame, out, setting: str | None = None,
                num_pairs: int | None = None, stop_loss: float | None = 1e-3,
                title: str | None = None) -> Path:
    """Eval loss against training step (Figure 3 style), one colour per model, one line per run.

    ``curves`` is ``load_curves(path)``; ``setting`` and ``num_pairs`` select from it. The
    last point of a run that diverged or failed is marked with a cross. ``stop_loss``: draw
    the training stop criterion (None: no line).
    """
    data = curves
    if setting is not None:
        data = data[data["setting"] == setting]
    if num_pairs is not None:
        data = data[data["num_pairs"] == num_pairs]
    data = data[np.isfinite(data["eval_loss"].astype(float))]
    if data.empty:
        raise ValueError(f"no curve points for setting={setting!r}, num_pairs={num_pairs!r}")
    floor = _log_floor(data["eval_loss"], stop_loss)
    data = data.assign(eval_loss=data["eval_loss"].clip(lower=floor))
    palette = model_palette(data["model"])

    figure, ax = _new_figure()
    sns.lineplot(data=data, x="step", y="eval_loss", hue="model", units="run_id", estimator=None,
                 palette=palette, hue_order=sorted(palette), lw=1.2, alpha=0.85, ax=ax)
    handles = _loss_axis(ax, data["eval_loss"], floor, stop_loss)
    if stop_loss is not None:
        handles[-1].set_label(f"stop loss {stop_loss:g}")
    ends = data[data["status"] != "done"].groupby("run_id").tail(1)
    if len(ends):
        ax.scatter(ends["step"], ends["eval_loss"], marker="x", s=40, zorder=5,
                   color=[palette[m] for m in ends["model"]])
        handles.append(Line2D([], [], color="0.2", marker="x", ls="",
                              label=f"last point before divergence / failure ({len(ends)})"))
    ax.set_xlabel("training step")
    ax.set_ylabel("eval loss")
    where = ", ".join(part for part in (setting, f"S = {num_pairs}" if num_pairs else None) if part)
    ax.set_title(title or f"eval loss during training{': ' + where if where else ''}")
    _legend(ax, handles)
    return _save(figure, out)


def plot_recall(runs: pd.DataFrame, out, metric: str = "own_slice", title: str | None = None) -> Path:
    """Multi-query recall against memory size (Zoology's Figure 2 style): one panel per
    number of pairs N the models were trained on, accuracy against state size (floats in the
    memory, log x), one line per model family (its label without the key width).

    metric "own_slice": accuracy (at the best evaluation) on the slice of N pairs the model was
    trained on; any other metric column of ``load_runs`` (e.g. "best_accuracy", the mean over
    the evaluation slices) can be named instead."""
    data = runs[runs["setting"] == "mqar"].copy()
    if data.empty:
        raise ValueError("no mqar runs to plot")
    if metric == "own_slice":
        columns = [f"best_accuracy/num_kv_pairs={n}" for n in data["num_pairs"]]
        if not all(c in data for c in columns):
            raise ValueError("runs lack per-slice accuracy for their own number of pairs")
        data[metric] = [row[c] for c, (_, row) in zip(columns, data.iterrows())]
    if metric not in data:
        raise ValueError(f"the runs have no metric {metric!r}")
    data["family"] = data["model"].str.replace(r" d_key=\d+", "", regex=True)
    palette = model_palette(data["family"])
    pairs = sorted(data["num_pairs"].unique())
    figure = Figure(figsize=(3.6 * len(pairs) + 1.6, 3.6), layout="constrained")
    axes = figure.subplots(1, len(pairs), sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, pairs):
        panel = data[data["num_pairs"] == n]
        sns.lineplot(data=panel, x="state_size", y=metric, hue="family", palette=palette, marker="o",
                     errorbar=("ci", 95), ax=ax, legend=ax is axes[-1])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels collide on short ranges
        ax.set_title(f"N = {n} pairs")
        ax.set_xlabel("state size (floats)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title=None)
    figure.suptitle(title or "multi-query associative recall against state size")
    return _save(figure, out)
