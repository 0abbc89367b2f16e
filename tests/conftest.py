import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1 if os.environ.get("CI") else min(2, os.cpu_count() or 1))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def fresh_python():
    """run(code) -> CompletedProcess: code run by a new interpreter in the repository root,
    the suite importable (what a process imports or does at exit, unlike this one's)."""
    import subprocess

    def run(code: str, timeout: float = 300):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=timeout)
    return run


@pytest.fixture(params=["native", "native-chunkwise", "torch"])
def native_steps(request, monkeypatch):
    """Run the FWM write (sequential at tiny states; "native-chunkwise": the chunked C write
    always), the delta rule's answer, DPFP's and FAVOR+'s kernels, the ELU + 1 and tanh maps,
    the sum normalisation and the projection lookups (single and stacked models) compiled
    (skipped without a C compiler) or in PyTorch."""
    import models.feature_maps as feature_maps
    import models.normalisation as normalisation
    import models.projection as projection
    import models.rules.delta as delta
    import models.rules.fwm as fwm
    from models.rules import native

    if request.param.startswith("native") and native._library() is None:
        pytest.skip("no C compiler: the native steps are not built")
    if request.param == "native-chunkwise":
        monkeypatch.setattr(fwm, "SEQUENTIAL_STATE_BYTES", -1)
    if request.param == "torch":
        for module in (fwm, delta, feature_maps, normalisation, projection):
            monkeypatch.setattr(module, "steps", lambda *tensors: None)
    return request.param
