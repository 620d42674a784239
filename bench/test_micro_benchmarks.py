"""pytest-benchmark micro-benchmarks (kernels, loaders, GEMM convs). Out of the default test run (testpaths = tests):

    python -m pytest bench/test_micro_benchmarks.py --benchmark-only [--benchmark-json micro.json]

pytest-benchmark calibrates rounds and reports min/median/IQR per case; compare cases of one run, side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastp2p.config import DataConfig

FACADES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "facades" / "train"


@pytest.fixture(scope="module")
def facades_dataset():
    if not FACADES.is_dir():
        pytest.skip(f"CMP Facades not found at {FACADES}")
    from fastp2p.data import build_dataset

    return build_dataset(DataConfig(data=str(FACADES), direction="BtoA", num_workers=0), 3, 3, seed=0)


def test_loader_item_fastp2p(benchmark, facades_dataset):
    """One facades pair through fastp2p's loader path: decode, split, resize 286, crop 256, flip, to [-1, 1]."""
    n = len(facades_dataset)
    it = iter(range(10**9))
    benchmark(lambda: facades_dataset[next(it) % n])


def test_loader_item_reference_style(benchmark, facades_dataset):
    """The same work done the reference's way, per image in Python (PIL + float conversion per half)."""
    paths = facades_dataset.paths
    it = iter(range(10**9))

    def item():
        ab = Image.open(paths[next(it) % len(paths)]).convert("RGB")
        w, h = ab.size
        out = []
        for box in ((0, 0, w // 2, h), (w // 2, 0, w, h)):
            im = ab.crop(box).resize((286, 286), Image.BICUBIC).crop((10, 10, 266, 266))
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
            t = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)
            out.append((t - 0.5) / 0.5)
        return out

    benchmark(item)


@pytest.mark.parametrize("path", ["native", "gemm"])
@pytest.mark.parametrize("cin,cout,hw", [(1024, 512, 2), (1024, 512, 8)])
def test_conv_transpose_fwd_bwd(benchmark, path, cin, cout, hw):
    from fastp2p.perf import gemm_conv_transpose2d

    x = torch.randn(1, cin, hw, hw, requires_grad=True)
    w = (torch.randn(cin, cout, 4, 4) * 0.02).requires_grad_()
    fn = F.conv_transpose2d if path == "native" else gemm_conv_transpose2d

    def step():
        fn(x, w, None, 2, 1).sum().backward()

    benchmark(step)


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", [(1, 128, 64, 64), (1, 512, 2, 2)], ids=["128x64x64", "bottleneck-512x2x2"])
def test_batchnorm_leaky_relu_fwd_bwd(benchmark, impl, shape):
    """Batch norm (training) + LeakyReLU(0.2), forward and backward: eager PyTorch vs fastp2p.kernels (Triton on CUDA,
    its torch backend on a CPU, where Triton only interprets)."""
    from fastp2p.kernels import FusedNormAct, default_backend
    from torch import nn

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bn = nn.BatchNorm2d(shape[1]).to(dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    mod = FusedNormAct(bn, "leaky_relu", 0.2, backend=default_backend()) if impl == "fused" else None

    def step():
        y = mod(x) if mod is not None else F.leaky_relu(bn(x), 0.2)
        y.sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
