"""One training run, fully described: every constant of the paper's protocol is a visible default.

A ``RunConfig`` is data: it round-trips through JSON, rejects unknown fields, validates itself,
and its canonical JSON (with the seed) gives the stable run id used by the results store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from dataclasses import dataclass, field

from tasks.associative import SETTINGS
from tasks.evaluation import PROTOCOLS


TASK_SETTINGS = SETTINGS + ("mqar",)


def source_digest(feature_map: str) -> str:
    """sha256 of the file defining a user feature map ("" for registered maps and softmax)."""
    if ":" not in feature_map:
        return ""
    module = feature_map.rpartition(":")[0]
    if module.endswith(".py"):
        path = Path(module).expanduser()
    else:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        path = Path(spec.origin) if spec is not None and spec.origin else None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else ""
    except OSError:
        return ""   # unreadable: validation reports it


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line for the user."""


@dataclass(frozen=True)
class RunConfig:
    # task
    setting: str = "capacity"            # "capacity" (Setting 1), "overwrite" (Setting 2), "mqar"
    num_pairs: int = 20                  # S (mqar: the number of key-value pairs N)
    task_options: dict = field(default_factory=dict)      # mqar: vocab_size, seq_len, power_a, ...
    # model
    feature_map: str = "linear"          # registry name, "softmax", or module:Class
    feature_options: dict = field(default_factory=dict)   # e.g. {"nu": 2}, {"m": 128}
    rule: str = "sum"
    rule_options: dict = field(default_factory=dict)
    d_key: int = 64
    d_emb: int | None = None             # None: int(2.2 S), as the original code
    # optimisation (the paper's protocol)
    lr: float = 1e-3                     # Adam, PyTorch defaults otherwise
    batch_size: int = 32
    max_steps: int = 100_000
    eval_every: int = 100
    eval_sequences: int = 20
    stop_loss: float = 1e-3              # stop once the eval loss is <= this
    patience: int = 11                   # stop after this many evaluations without a new best
    protocol: str = "paper"              # "paper" or "clean" evaluation (tasks/evaluation.py)
    seed: int = 0

    def validate(self) -> "RunConfig":
        if self.setting not in TASK_SETTINGS:
            raise ConfigError(f"unknown setting {self.setting!r}; choose from {', '.join(TASK_SETTINGS)}")
        if self.setting != "mqar" and self.task_options:
            raise ConfigError(f"the {self.setting} setting takes no task options, got {sorted(self.task_options)}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        positive = {"num_pairs": 2, "d_key": 1, "batch_size": 1, "max_steps": 1, "eval_every": 1,
                    "eval_sequences": 1, "patience": 1}
        for name, low in positive.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                label = "S (--keys)" if name == "num_pairs" else name
                raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")
        if self.d_emb is not None and (not isinstance(self.d_emb, int) or self.d_emb < 1):
            raise ConfigError(f"d_emb must be a positive integer or null, got {self.d_emb!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")
        if not isinstance(self.stop_loss, (int, float)) or isinstance(self.stop_loss, bool):
            raise ConfigError(f"stop_loss must be a number, got {self.stop_loss!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("feature_options", "rule_options", "task_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a table of options, got {getattr(self, name)!r}")
        for name in ("setting", "feature_map", "rule", "protocol"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        # Building the task and the model checks every option, the feature map and the rule.
        import torch
        try:
            from training.trainer import make_task
            with torch.random.fork_rng(devices=[]):    # building a model draws its init
                make_task(self).check()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        except TypeError as error:
            raise ConfigError(f"bad option value ({error})") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "RunConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        """Stable id of (config, seed): the same run always gets the same id. For a feature map
        of the user's own (named by import path) the id also covers its source code, so an
        edited map is a new run, never a stale hit in the store."""
        identity = self.canonical_json() + source_digest(self.feature_map)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    @property
    def model_label(self) -> str:
        """A short name a researcher recognises, e.g. "DPFP-2 delta", "FAVOR+ 64 sum"."""
        options = self.feature_options
        if self.feature_map == "softmax":
            return "Softmax" + (f" d_key={self.d_key}" if self.d_key != 64 else "")
        names = {"linear": "Linear", "dpfp": f"DPFP-{options.get('nu', 1)}",
                 "favor": f"FAVOR+ {options.get('m', 64)}", "tanh": "tanh", "identity": "Identity"}
        name = names.get(self.feature_map, self.feature_map.rpartition(":")[2] or self.feature_map)
        extra = "".join(f" {k}={v}" for k, v in sorted(options.items())
                        if self.feature_map not in ("dpfp", "favor") or k not in ("nu", "m"))
        width = f" d_key={self.d_key}" if self.d_key != 64 else ""
        rule_extra = "".join(f" {k}={v}" for k, v in sorted(self.rule_options.items()))
        return f"{name}{extra} {self.rule}{rule_extra}{width}"
