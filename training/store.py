"""The results store: one SQLite file, one row per run, the eval curve in its own table.

Every run is written in a single transaction (the run row and its whole curve), so a process
killed at any moment leaves either the complete run or nothing. WAL journaling keeps readers
(notebooks, plots) working while a sweep writes.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("done", "diverged", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    config          TEXT NOT NULL,
    setting         TEXT NOT NULL,
    num_pairs       INTEGER NOT NULL,
    feature_map     TEXT NOT NULL,
    rule            TEXT NOT NULL,
    model           TEXT NOT NULL,
    d_dot           INTEGER,
    state_size      INTEGER,
    protocol        TEXT NOT NULL,
    seed            INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('done', 'diverged', 'failed')),
    solved          INTEGER NOT NULL,
    best_eval_loss  REAL,
    final_eval_loss REAL,
    best_step       INTEGER,
    steps           INTEGER NOT NULL,
    wall_time_s     REAL NOT NULL,
    error           TEXT,
    metrics         TEXT,
    versions        TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS eval_curve (
    run_id     TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    eval_loss  REAL,
    train_loss REAL,
    PRIMARY KEY (run_id, step)
);
"""

RUN_COLUMNS = ("run_id", "config", "setting", "num_pairs", "feature_map", "rule", "model", "d_dot",
               "state_size", "protocol", "seed", "status", "solved", "best_eval_loss",
               "final_eval_loss", "best_step", "steps", "wall_time_s", "error", "metrics",
               "versions", "created_at")


class StoreError(RuntimeError):
    """The store cannot be used; its message is one line for the user."""


SUITE_COMMIT_ENV = "FWR_SUITE_COMMIT"


@functools.lru_cache(maxsize=None)
def suite_commit() -> str:
    """The suite's git commit ("-dirty" when tracked files differ from it), so that every stored
    run says which code produced it; "unknown" outside a git checkout. The Ray driver passes its
    own in FWR_SUITE_COMMIT to workers, whose copy of the repository has no .git."""
    if os.environ.get(SUITE_COMMIT_ENV):
        return os.environ[SUITE_COMMIT_ENV]
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    try:
        head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")


def library_versions() -> dict:
    import platform

    import numpy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "suite": suite_commit()}


class ResultsStore:
    """Open (creating if asked) and check a results store. Use as a context manager or close()."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"store {self.path} is a directory, not an SQLite file")
        if not self.path.exists():
            if not create:
                raise StoreError(f"store {self.path} does not exist")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(f"cannot create store directory {self.path.parent}: {error.strerror}") from None
        elif not os.access(self.path, os.R_OK):
            raise StoreError(f"store {self.path} is not readable")
        try:
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA foreign_keys = ON")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise StoreError(f"store {self.path} is not a valid results store ({error})") from None
        if tables and not {"runs", "eval_curve"} <= tables:
            self.conn.close()
            raise StoreError(f"store {self.path} is an SQLite file but not a results store "
                             f"(tables: {', '.join(sorted(tables))})")
        if tables and version != SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(f"store {self.path} has schema version {version}, expected {SCHEMA_VERSION}")
        if not tables:
            if not create:
                self.conn.close()
                raise StoreError(f"store {self.path} is empty")
            try:
                self.conn.executescript("BEGIN IMMEDIATE;" + SCHEMA
                                        + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            except sqlite3.OperationalError as error:
                raise StoreError(f"cannot write store {self.path} ({error})") from None
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass  # read-only location: reads still work

    def transaction(self):
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- queries -------------------------------------------------------------------------
    def has_run(self, run_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def run_ids(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT run_id FROM runs")}

    def get_run(self, run_id: str) -> dict | None:
        cursor = self.conn.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,))
        row = cursor.fetchone()
        return dict(zip(RUN_COLUMNS, row)) if row else None

    def curve(self, run_id: str) -> list[tuple[int, float, float]]:
        return self.conn.execute("SELECT step, eval_loss, train_loss FROM eval_curve WHERE run_id = ? "
                                 "ORDER BY step", (run_id,)).fetchall()

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # --- writes --------------------------------------------------------------------------
    def put_run(self, result: dict, replace: bool = False) -> bool:
        """Write a finished run (a dict from training.trainer) and its curve atomically.

        Returns False (and writes nothing) when the run is already stored and ``replace`` is
        False: another process sharing the store may have finished the same run first."""
        row = dict(result)
        curve = row.pop("curve")
        row["config"] = json.dumps(row["config"], sort_keys=True)
        row["versions"] = json.dumps(row.get("versions") or library_versions(), sort_keys=True)
        row["metrics"] = json.dumps(row.get("metrics") or {}, sort_keys=True)
        row.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        row.setdefault("error", None)
        values = [row[name] for name in RUN_COLUMNS]
        with self.transaction():
            if replace:
                self.conn.execute("DELETE FROM runs WHERE run_id = ?", (row["run_id"],))
            inserted = self.conn.execute(
                f"INSERT OR IGNORE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(RUN_COLUMNS))})", values).rowcount
            if not inserted:
                return False
            self.conn.executemany("INSERT INTO eval_curve (run_id, step, eval_loss, train_loss) "
                                  "VALUES (?, ?, ?, ?)",
                                  [(row["run_id"], s, e, t) for s, e, t in curve])
        return True

    def failed_run_ids(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT run_id FROM runs WHERE status = 'failed'")}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.owner = True
        else:
            self.owner = False
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if not self.owner:
            return False
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        return False
