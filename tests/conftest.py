import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before any @triton.jit decorator runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FACADES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "facades"


@pytest.fixture
def facades() -> Path:
    if not (FACADES / "train").is_dir():
        pytest.skip(f"CMP Facades not found at {FACADES} (the shared/ folder beside the repo)")
    return FACADES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
