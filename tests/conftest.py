import os
from pathlib import Path

# As the CLI does before torch loads (fastp2p.cli.main, fastp2p.perf.WAIT_ENV): short OpenMP spin-waits, so the suite
# does not slow down many times over when another process shares the cores.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "1")
# `--backend auto` would pick OpenVINO for every .onnx; OpenVINO once segfaulted this shared process, so its cases run
# in a subprocess of their own (tests/test_openvino.py, which unsets this per case). It also keeps compiled models
# out of ~/.cache/fastp2p/openvino during the suite.
os.environ.setdefault("FASTP2P_BACKEND", "onnxruntime")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def cuda():
    """The CUDA device, for tests marked ``gpu`` (skips without one). cuDNN runs exact for the test: no TF32 convs, a
    deterministic algorithm, no autotuning (a Trainer built earlier turns cudnn.benchmark on process-wide); the flags
    are restored afterwards. Legacy setters only: they keep the new ``fp32_precision`` state in step, while mixing in
    the new API makes later legacy reads raise (see bench/gpu_plan.set_legacy_tf32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cudnn = torch.backends.cudnn
    saved = (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, True, False
    try:
        yield torch.device("cuda")
    finally:
        torch.cuda.synchronize()
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def write_smooth_pairs(folder: Path, n: int = 3, size: int = 128) -> Path:
    """``n`` aligned A|B files of size x 2*size in ``folder``: smooth random A (a random walk along each row), B = a
    brighter copy, so scores between generators are not noise. Module-scoped fixtures of test_eval / test_gate."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.clip(np.cumsum(rng.integers(-8, 9, (size, size, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
        b = np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8)
        Image.fromarray(np.concatenate([a, b], axis=1)).save(folder / f"p{i}.png")
    return folder
