"""Memory limits: the largest number of pairs S a model retrieves reliably, against its d_dot.

The paper's claim (Schlag et al. 2021, arXiv 2102.11174, Sec. 4) is that a linear-attention
memory with feature map phi can keep at most d_dot = dim(phi) keys apart, so retrieval breaks
once S exceeds d_dot. ``memory_limits`` turns a capacity sweep (runs at several S, possibly
several seeds each) into one estimate S* per model, with a bootstrap interval over seeds, to
set against d_dot.

Definitions (all in ``memory_limits``):

- A size S is *solved* when the mean over seeds of the runs' best eval loss is <= threshold.
  Runs that did not finish cleanly (status "diverged" or "failed") count as loss +inf: a model
  whose training blows up at S has not shown that it can store S pairs.
- The *largest S solved* (S*) is the knee of the sweep: the largest S such that it AND every
  smaller S of the sweep are solved. A lucky solve above the first failure does not move S*
  (``solved_above`` counts such sizes, a sign of noise or too few seeds). S* = 0 means that
  even the smallest S of the sweep fails.
- The *first failing S* is the smallest unsolved S (missing when every S is solved).

Why the default threshold is 1e-2, not the 1e-3 at which training stops: the loss is
0.5 |y - v|^2 per query, so a zero output costs 0.5 and a confidently wrong one-hot costs 1.0.
A mean loss <= 1e-2 therefore bounds the failed retrievals at roughly 1-2% of queries. Runs
below capacity reach 1e-3 and stop; runs near capacity plateau between 1e-3 and 1e-2 until the
patience rule ends them, so a 1e-3 cut would place the knee where the optimiser gave up
rather than where the memory ran out. Pass ``threshold=1e-3`` for the strict reading.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

DEFAULT_THRESHOLD = 1e-2
GROUP = ["setting", "protocol", "model"]


def run_losses(runs: pd.DataFrame) -> pd.Series:
    """Each run's best eval loss, +inf where the run diverged, failed or has no evaluation."""
    loss = runs["best_eval_loss"].astype(float)
    usable = (runs["status"] == "done") & np.isfinite(loss)
    return loss.where(usable, np.inf)


def leading_solved(solved: np.ndarray) -> np.ndarray:
    """How many sizes, from the smallest, are solved without a gap (along the last axis)."""
    return np.cumprod(solved, axis=-1).sum(axis=-1)


def knee(sizes, mean_losses, threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int | None]:
    """(largest S solved, first failing S) of one sweep; sizes ascending, one mean loss each.

    Largest S solved is 0 when the smallest size fails; first failing is None when none does.
    """
    sizes = np.asarray(sizes)
    count = int(leading_solved(np.asarray(mean_losses) <= threshold))
    largest = int(sizes[count - 1]) if count else 0
    first_failing = int(sizes[count]) if count < len(sizes) else None
    return largest, first_failing


def _bootstrap_largest(losses_by_size: list[np.ndarray], sizes: np.ndarray, threshold: float,
                       n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] largest-solved S, resampling the seeds of every size with replacement."""
    solved = np.stack([
        rng.choice(losses, size=(n_boot, len(losses)), replace=True).mean(axis=1) <= threshold
        for losses in losses_by_size], axis=1)                                # [n_boot, n_sizes]
    count = leading_solved(solved)                                          # [n_boot]
    return np.where(count > 0, sizes[np.maximum(count - 1, 0)], 0)


def memory_limits(runs: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """One row per (setting, protocol, model): S*, first failing S and a 95% bootstrap interval.

    ``runs`` is ``load_runs(path)`` (or any subset of it). Columns of the result:
    setting, protocol, model, d_dot (missing for softmax), largest_solved (S*, see the module
    docstring), first_failing (<NA> if every S is solved), ci_low / ci_high (2.5 / 97.5
    percentiles of S* when each size's seeds are resampled with replacement; with one seed per
    size the interval is the point), limit_per_d_dot (S* / d_dot), state_size_at_limit (floats
    in the memory at S*), min_size / max_size (the sweep's range), sizes, seeds (most seeds at
    any S), solved_above (solved sizes above the first failure), unfinished (diverged or
    failed runs).

    The bootstrap of each model draws from its own stream derived from ``seed`` and the model's
    key, so adding a model to the store does not change the others' intervals.
    """
    columns = GROUP + ["d_dot", "largest_solved", "first_failing", "ci_low", "ci_high",
                       "limit_per_d_dot", "state_size_at_limit", "min_size", "max_size", "sizes",
                       "seeds", "solved_above", "unfinished"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(_loss=run_losses(runs))
    rows = []
    for key, group in runs.groupby(GROUP, sort=True):
        by_size = {int(S): part["_loss"].to_numpy() for S, part in group.groupby("num_pairs")}
        sizes = np.array(sorted(by_size))
        losses = [by_size[S] for S in sizes]
        means = np.array([values.mean() for values in losses])
        largest, first_failing = knee(sizes, means, threshold)

        rng = np.random.default_rng([seed, zlib.crc32("|".join(map(str, key)).encode())])
        boot = _bootstrap_largest(losses, sizes, threshold, n_boot, rng)
        d_dot = group["d_dot"].iloc[0]
        d_dot = None if pd.isna(d_dot) else int(d_dot)
        at_limit = group.loc[group["num_pairs"] == largest, "state_size"].dropna()
        above = sizes > (first_failing if first_failing is not None else sizes[-1])
        rows.append({
            **dict(zip(GROUP, key)),
            "d_dot": d_dot,
            "largest_solved": largest,
            "first_failing": first_failing,
            # "lower"/"higher" keep the bounds on sizes that were actually swept.
            "ci_low": int(np.percentile(boot, 2.5, method="lower")),
            "ci_high": int(np.percentile(boot, 97.5, method="higher")),
            "limit_per_d_dot": largest / d_dot if d_dot else np.nan,
            "state_size_at_limit": int(at_limit.median()) if len(at_limit) else None,
            "min_size": int(sizes[0]),
            "max_size": int(sizes[-1]),
            "sizes": len(sizes),
            "seeds": max(len(values) for values in losses),
            "solved_above": int((above & (means <= threshold)).sum()),
            "unfinished": int((group["status"] != "done").sum()),
        })
    table = pd.DataFrame(rows, columns=columns)
    for column in ("d_dot", "first_failing", "state_size_at_limit"):
        table[column] = table[column].astype("Int64")
    return (table.sort_values(["setting", "protocol", "d_dot", "model"], na_position="last")
            .reset_index(drop=True))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a DataFrame's cells as printed by str()."""
    def cell(value) -> str:
        text = "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)
        return text.replace("|", "\\|")

    header = [cell(name) for name in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def capacity_table(limits: pd.DataFrame) -> str:
    """``memory_limits``'s result as a markdown table a README or a notebook can print.

    S* = 0 is shown as "< smallest S"; a sweep with no failure as "none up to largest S". A
    protocol column appears when the table mixes protocols.
    """
    def size(value, row) -> str:
        return f"< {row.min_size}" if value == 0 else str(value)

    rows = []
    for row in limits.itertuples(index=False):
        rows.append({
            "setting": row.setting,
            "model": row.model,
            "d_dot": "-" if pd.isna(row.d_dot) else str(row.d_dot),
            "S* (largest solved)": size(row.largest_solved, row),
            "95% interval": f"[{size(row.ci_low, row)}, {size(row.ci_high, row)}]",
            "first failing S": (f"none up to {row.max_size}" if pd.isna(row.first_failing)
                                else str(row.first_failing)),
            "S* / d_dot": "-" if pd.isna(row.limit_per_d_dot) else f"{row.limit_per_d_dot:.2f}",
            "seeds": str(row.seeds),
        })
    columns = ["setting", "model", "d_dot", "S* (largest solved)", "95% interval",
               "first failing S", "S* / d_dot", "seeds"]
    table = pd.DataFrame(rows, columns=columns)
    if limits["protocol"].nunique() > 1:   # otherwise rows of different protocols look alike
        table.insert(1, "protocol", limits["protocol"].to_numpy())
    return markdown_table(table)
