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


def trained_like(g, seed: int = 0, *, mean_std: float = 0.3, var_lo: float = 0.25, var_span: float = 1.5,
                 affine: bool = True):
    """Batch-norm layers of ``g`` as after training: running mean ~ N(0, mean_std), running var in [var_lo,
    var_lo + var_span), and (``affine``) weight ~ 1 + N(0, 0.2), bias ~ N(0, 0.1), so eval mode (folded statistics)
    and paper mode differ and the outputs vary. In place; returns ``g``."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * mean_std)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * var_span + var_lo)
                if affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return g
