"""Named single-model presets: the paper's models with their own hyper-parameters, visibly.

A preset fixes the model (feature map, options, rule) and any protocol constant that the
paper changed for that model; the command line supplies the setting, S and the seed.
"""
from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    "softmax": {"feature_map": "softmax", "rule": "sum"},
    "linear": {"feature_map": "linear", "rule": "sum"},
    "linear-delta": {"feature_map": "linear", "rule": "delta"},
    "dpfp1": {"feature_map": "dpfp", "feature_options": {"nu": 1}, "rule": "sum"},
    "dpfp2": {"feature_map": "dpfp", "feature_options": {"nu": 2}, "rule": "sum"},
    "dpfp3": {"feature_map": "dpfp", "feature_options": {"nu": 3}, "rule": "sum"},
    "dpfp1-delta": {"feature_map": "dpfp", "feature_options": {"nu": 1}, "rule": "delta"},
    "dpfp2-delta": {"feature_map": "dpfp", "feature_options": {"nu": 2}, "rule": "delta"},
    "favor64": {"feature_map": "favor", "feature_options": {"m": 64}, "rule": "sum"},
    "favor128": {"feature_map": "favor", "feature_options": {"m": 128}, "rule": "sum"},
    "favor512": {"feature_map": "favor", "feature_options": {"m": 512}, "rule": "sum"},
    "dpfp1-fwl": {"feature_map": "dpfp", "feature_options": {"nu": 1}, "rule": "fwl"},
    "favor64-delta": {"feature_map": "favor", "feature_options": {"m": 64}, "rule": "delta"},
    "favor128-delta": {"feature_map": "favor", "feature_options": {"m": 128}, "rule": "delta"},
    # Schlag, Munkhdalai & Schmidhuber (2021) FWM. The tanh variant needed its own learning
    # rate and batch size in the original code (synthetic/main.py); the DPFP-1 variant did not.
    "schlag2021-tanh": {"feature_map": "tanh", "rule": "fwm", "lr": 1e-4, "batch_size": 128},
    "schlag2021-dpfp1": {"feature_map": "dpfp", "feature_options": {"nu": 1}, "rule": "fwm"},
}
