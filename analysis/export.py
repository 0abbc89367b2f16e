"""The store as flat files (CSV or Parquet) for tools that do not read SQLite.

The run table is ``load_runs``'s tidy DataFrame; cells that are not scalars (the ``versions``
dict, any list or dict) are written as JSON text so every column has one plain type. The
``config`` column is already the run's canonical JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.results import load_curves, load_runs

FORMATS = ("csv", "parquet")


def flatten(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with dict / list / tuple cells serialised to JSON text (sorted keys)."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, (dict, list, tuple))).any():
            frame[column] = frame[column].map(
                lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v)
    return frame


def _format(out: Path, format: str | None) -> str:
    chosen = (format or out.suffix.lstrip(".")).lower()
    if chosen not in FORMATS:
        given = f"format {format!r}" if format else f"suffix of {out.name!r}"
        raise ValueError(f"unknown export {given}; choose from {', '.join(FORMATS)}")
    return chosen


def write_table(frame: pd.DataFrame, out_path, format: str | None = None) -> Path:
    """Write a DataFrame (flattened) as CSV or Parquet; ``format`` None: from the suffix."""
    out = Path(out_path)
    chosen = _format(out, format)     # checked before anything is written
    frame = flatten(frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    if chosen == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)   # needs pyarrow: pip install '.[parquet]'
    return out


def export_runs(store_path, out_path, format: str | None = "csv") -> Path:
    """Write the store's run table (one row per run) to ``out_path``; returns the path.

    format: "csv" or "parquet" (None: taken from the suffix of ``out_path``). Anything else is
    a ValueError, raised before the store is read.
    """
    _format(Path(out_path), format)
    return write_table(load_runs(store_path), out_path, format)


def export_curves(store_path, out_path, format: str | None = "csv") -> Path:
    """Write the store's eval curves (one row per evaluation, with run fields) to ``out_path``."""
    _format(Path(out_path), format)
    return write_table(load_curves(store_path), out_path, format)
