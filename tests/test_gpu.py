"""GPU-only checks (``pytest -m gpu``; every test takes the ``cuda`` fixture, so each skips without a CUDA GPU):
the compiled Triton norm kernels against a float64 reference at the pix2pix nets' real norm sites (batch 16, fp32 and
bf16, channels-last, outputs poisoned with NaN before the kernels run), the fused modules under ``torch.compile``, and
the U-Net's norm slice writes against the relu_cat path, and the gpu-cache loader on CUDA against the same loader on
the CPU. TensorRT's GPU tests live in tests/test_engines.py,
the CUDA-graph step's in tests/test_graphs.py, DALI mixed in tests/test_loaders_sync_free.py (all marked ``gpu``)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from fastp2p.bench import gpu_plan
from PIL import Image
from torch import nn

from fastp2p import kernels
from fastp2p.config import DataConfig
from fastp2p.data import build_dataset, make_loader
from fastp2p.data.gpu_cache import GpuCacheLoader

pytestmark = pytest.mark.gpu
na = kernels.norm_act

# Real norm sites of unet_256 + the basic PatchGAN at 256x256 (bench/kernels.norm_sites), at batch 16.
SITES = [
    pytest.param((16, 64, 128, 128), "none", id="16x64x128x128-G.up_norm.1-outermost-up"),
    pytest.param((16, 128, 64, 64), "leaky_relu", id="16x128x64x64-G.down_norm.1-D.model.3"),
    pytest.param((16, 256, 32, 32), "leaky_relu", id="16x256x32x32-G.down_norm.2"),
    pytest.param((16, 512, 31, 31), "leaky_relu", id="16x512x31x31-D-last-norm-odd-hw"),
    pytest.param((16, 512, 4, 4), "leaky_relu", id="16x512x4x4-G.down_norm.5"),
    pytest.param((16, 512, 2, 2), "none", id="16x512x2x2-G.up_norm.7-innermost-up"),
]


def _compiled_triton():
    if not na.triton_usable("cuda"):
        pytest.skip("Triton is not installed")
    assert not na._interpreting(), "TRITON_INTERPRET=1 is set: these tests are for the compiled kernels"


VARIANTS = list(getattr(na, "VARIANTS", ())) or [None]  # the Triton implementations FusedNormAct offers


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,act", SITES)
def test_compiled_kernels_match_float64_at_real_sites(cuda, shape, act, dtype, variant):
    """FusedNormAct in training mode, fwd + bwd with poisoned outputs, channels-last: y, dx, dw, db and the updated
    running statistics against float64 (gpu_plan.check_site, which the GPU plan's kernels_exact step also runs)."""
    _compiled_triton()
    r = gpu_plan.check_site(shape, dtype, "batch", act, "cuda", variant)
    assert r["channels_last_kept"], "the kernels returned NCHW for a channels-last input"
    assert r["pass"], f"errors {r['errors']} over tolerance {r['tolerance']:.2g} (n={r['n_per_channel']})"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stats", ["instance", "running"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernels_other_statistics(cuda, stats, dtype, variant):
    """Paper-mode inference (per-sample statistics) and eval (running statistics), incl. the U-Net's 2x2 level."""
    _compiled_triton()
    for shape, act in (((4, 128, 64, 64), "leaky_relu"), ((4, 512, 2, 2), "none")):
        r = gpu_plan.check_site(shape, dtype, stats, act, "cuda", variant)
        assert r["pass"], (shape, r["errors"], r["tolerance"])


@pytest.mark.parametrize("registration", ["custom_op", "triton_op"])
def test_fused_norm_act_under_torch_compile_matches_eager(cuda, registration):
    """fullgraph=True (no graph break around the op), same forward, input gradient and running statistics as the
    uncompiled module. Inductor may reorder fp32 arithmetic around the kernels: the bound is fp32 rounding over the
    N*H*W = 8192 values per channel (gpu_plan.fp32_tolerance)."""
    _compiled_triton()
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(64).cuda()
    nn.init.normal_(bn.weight, 1.0, 0.2)
    eager = kernels.FusedNormAct(copy.deepcopy(bn), "leaky_relu", 0.2, "triton", registration=registration)
    comp_mod = kernels.FusedNormAct(copy.deepcopy(bn), "leaky_relu", 0.2, "triton", registration=registration)
    compiled = torch.compile(comp_mod, fullgraph=True)
    x = torch.randn(8, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    outs = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    tol = gpu_plan.fp32_tolerance(8 * 32 * 32)
    for a, b in zip(outs[0], outs[1], strict=True):
        assert gpu_plan.max_rel_err(b, a) <= tol
    torch.testing.assert_close(comp_mod.running_mean, eager.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_mod.running_var, eager.running_var, rtol=1e-5, atol=1e-6)
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_norm_writes_equal_relu_cat_on_cuda(cuda, variant):
    """kernels/unet_skip's norm writes on compiled kernels: unet_256 at batch 2, bf16 autocast, channels-last, train
    mode (dropout, same seed), poisoned buffers; forward, input gradient, every parameter gradient and the running
    statistics equal the relu_cat path's bit for bit (same kernels, same configs; deterministic cuDNN)."""
    _compiled_triton()
    from fastp2p.models.unet import UnetGenerator

    torch.manual_seed(0)
    base = UnetGenerator(3, 3, num_downs=8, ngf=16).cuda().to(memory_format=torch.channels_last)
    kernels.apply_fused_kernels(base, "triton", variant=variant)
    models = [kernels.apply_fused_skips(copy.deepcopy(base), norm_writes=w) for w in (False, True)]
    x = torch.randn(2, 3, 256, 256, device="cuda").contiguous(memory_format=torch.channels_last)
    outs = []
    for g in models:
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        with na.poisoned_outputs(), torch.autocast("cuda", torch.bfloat16):
            y = g(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, {k: p.grad for k, p in g.named_parameters()}, dict(g.named_buffers())))
    (ya, ga, pa, ba), (yb, gb, pb, bb) = outs
    assert not torch.isnan(yb).any()
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=0, msg=k)
    for k in ba:
        torch.testing.assert_close(bb[k], ba[k], rtol=0, atol=0, msg=k)


# -- gpu-cache on CUDA -------------------------------------------------------------------------------------------------
LEVEL = 2 / 255  # one uint8 level in [-1, 1]


def _pairs(root: Path, n: int = 6, h: int = 40, w: int = 48) -> Path:
    """Smooth JPEG pairs with structure in both directions (crops and flips are visible)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        halves = []
        for _ in range(2):
            f = rng.uniform(0.05, 0.3, size=(3, 2))
            img = np.stack([127 + 100 * np.sin(f[c, 0] * x + c) * np.cos(f[c, 1] * y) + x for c in range(3)], -1)
            halves.append(np.clip(img, 0, 255).astype(np.uint8))
        Image.fromarray(np.concatenate(halves, 1)).save(root / f"{i:03d}.jpg", quality=92)
    return root


@pytest.mark.parametrize("preprocess,max_levels", [
    ("crop", 0),  # no resize: split, crop (past the border: zeros), flip, normalize are exact on any device
    # resize: the same bicubic filter in float32 on both devices, rounded to uint8 levels once; a value that lands
    # within float rounding of a .5 level boundary may round the other way: at most one level
    ("resize_and_crop", 1),
])
def test_gpu_cache_on_cuda_yields_the_cpu_loaders_tensors(cuda, tmp_path, preprocess, max_levels):
    root = _pairs(tmp_path / "d")
    cfg = DataConfig(data=str(root), preprocess=preprocess, load_size=36, crop_size=44 if preprocess == "crop" else 32,
                     num_workers=0)
    ds = build_dataset(cfg, seed=3)
    on_cpu = GpuCacheLoader(ds, 4, 3, device="cpu")
    on_gpu = GpuCacheLoader(ds, 4, 3, device="cuda")
    assert len(on_cpu) == len(on_gpu) == 2  # 6 pairs, batch 4: the partial last batch kept
    for epoch in (0, 1):
        ref = list(on_cpu.batches(epoch))
        got = list(on_gpu.batches(epoch))
        torch_ref = list(make_loader(ds, 4, 0, 3).batches(epoch))
        for g, r, t in zip(got, ref, torch_ref, strict=True):
            assert g.paths == r.paths == t.paths
            for a, b in ((g.A, r.A), (g.B, r.B)):
                assert a.is_cuda and a.dtype == b.dtype == torch.float32 and a.shape == b.shape
                assert a.is_contiguous(memory_format=torch.channels_last)
                diff = (a.cpu() - b).abs()
                assert diff.max().item() <= max_levels * LEVEL + 1e-6
                assert (diff > 1e-6).float().mean().item() <= (0.0 if max_levels == 0 else 0.01)
            # and the torch (PIL) loader within tests/test_dali.py's resampler tolerance (6 levels, 0.5 on average)
            for a, b in ((g.A, t.A), (g.B, t.B)):
                d = (a.cpu() - b).abs() / LEVEL
                assert d.max().item() <= 6 and d.mean().item() <= 0.5
