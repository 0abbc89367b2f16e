"""The results store as tidy pandas DataFrames (one row per run; one row per curve point)."""
from __future__ import annotations

import json
import sqlite3

import pandas as pd

from training.store import ResultsStore


def _read(path, query: str) -> pd.DataFrame:
    store = ResultsStore(path, create=False)   # checks the file is a results store
    try:
        return pd.read_sql_query(query, store.conn)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as error:
        from training.store import StoreError
        raise StoreError(f"store {path} cannot be read ({error})") from None
    finally:
        store.close()


def load_runs(path) -> pd.DataFrame:
    """One row per run: its identifying fields, outcome, and the resolved config as columns.

    Feature-map options appear as columns (``nu``, ``m``, ...), so a DataFrame groupby can
    separate e.g. DPFP-1 from DPFP-2.
    """
    runs = _read(path, "SELECT * FROM runs ORDER BY model, setting, num_pairs, seed")
    if runs.empty:
        return runs
    configs = runs["config"].map(json.loads)
    for field in ("lr", "batch_size", "d_key", "max_steps"):
        runs[field] = configs.map(lambda c, f=field: c[f])
    options = pd.json_normalize(list(configs.map(lambda c: c["feature_options"])))
    for column in options.columns:
        runs[column] = options[column].values
    runs["solved"] = runs["solved"].astype(bool)
    if "metrics" in runs:   # e.g. best_accuracy, final_accuracy/num_kv_pairs=8
        metrics = pd.json_normalize(list(runs["metrics"].map(lambda m: json.loads(m or "{}"))))
        for column in metrics.columns:
            runs[column] = metrics[column].values
        runs = runs.drop(columns="metrics")
    runs["versions"] = runs["versions"].map(json.loads)
    return runs


def load_curves(path, run_ids=None) -> pd.DataFrame:
    """Eval curves joined with each run's model, setting, S and seed: one row per evaluation."""
    curves = _read(path, "SELECT c.run_id, c.step, c.eval_loss, c.train_loss, r.model, "
                         "r.setting, r.num_pairs, r.seed, r.rule, r.feature_map, r.status "
                         "FROM eval_curve c JOIN runs r USING (run_id) ORDER BY c.run_id, c.step")
    if run_ids is not None:
        curves = curves[curves["run_id"].isin(list(run_ids))]
    return curves.reset_index(drop=True)
