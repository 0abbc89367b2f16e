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


@pytest.fixture(params=["native", "torch"])
def fwm_steps(request, monkeypatch):
    """Run the FWM write's chunk steps compiled (skipped without a C compiler) or in PyTorch."""
    import models.rules.fwm as fwm
    from models.rules import native

    if request.param == "native" and native._library() is None:
        pytest.skip("no C compiler: the native FWM steps are not built")
    if request.param == "torch":
        monkeypatch.setattr(fwm, "steps", lambda *tensors: None)
    return request.param
