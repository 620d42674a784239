"""fastp2p.perf: the GEMM convs compute the same function and gradients as the native layers, the transforms keep the
state_dict, and the inference optimizer matches eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastp2p import perf
from fastp2p.config import Config, ModelConfig, TrainConfig
from fastp2p.inference import with_mode
from fastp2p.models import build_discriminator, build_generator


def _grads(layer: nn.Module, fn, x: torch.Tensor, g: torch.Tensor | None = None):
    """(y, dx, dW[, db]) of ``fn(x)`` for the output gradient ``g`` (default: a fixed random one)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    if g is None:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return (y.detach(), *torch.autograd.grad(y, params, g)), g


UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def _compare(native: nn.Module, gemm_fn, x: torch.Tensor):
    """``gemm_fn`` is a function of x using ``native``'s parameters, or a Gemm* copy of ``native``.

    Each of y, dx, dW and db is a sum of products of the inputs. The GEMM path and oneDNN add them up in different
    orders, and oneDNN's order (like MKL's) depends on the CPU's ISA, the kernel it picks and the thread count. In ANY
    order, a sum of at most n products computed with unit roundoff u is within gamma_n = n u / (1 - n u) of the exact
    sum, times the sum of the products' absolute values (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
    ed., eq. (3.5); FMA or not). So every element is checked against the same sums in float64 (from the same, exactly
    widened, inputs), within (gamma_n(u) + gamma_n(2^-53)) x that sum of absolute values, which the native layer
    computes when run in float64 on |x|, |W|, |b| with output gradient |g|. The bound holds on every CPU; a wrong tap,
    index, sign, stride or a missing term is off by about the value itself, far above it."""
    (y, *g), gy = _grads(gemm_fn if isinstance(gemm_fn, nn.Module) else native, gemm_fn, x)
    ref64 = copy.deepcopy(native).double()
    (ref_y, *ref_g), _ = _grads(ref64, ref64, x.double(), gy.double())
    with torch.no_grad():
        for p in ref64.parameters():
            p.abs_()
    (abs_y, *abs_g), _ = _grads(ref64, ref64, x.double().abs(), gy.double().abs())
    # n bounds the number of products in any one sum: y (Cin*kh*kw, + the bias), dx (Cout*kh*kw), dW and db (one per
    # batch position of the input or output).
    kh, kw = native.kernel_size
    n = (max(native.in_channels, native.out_channels) * kh * kw + 1
         + x.shape[0] * max(x.shape[-2] * x.shape[-1], y.shape[-2] * y.shape[-1]))
    c = _gamma(n, UNIT_ROUNDOFF[x.dtype]) + _gamma(n, UNIT_ROUNDOFF[torch.float64])
    assert y.shape == ref_y.shape and y.dtype == x.dtype
    names = ("y", "dx", "dW", "db")[:len(ref_g) + 1]
    for name, a, b, s in zip(names, (y, *g), (ref_y, *ref_g), (abs_y, *abs_g), strict=True):
        excess = ((a.double() - b).abs() - c * s).max().item()
        assert excess <= 0, f"{name}: error above the rounding bound by {excess:.3g} (max |value| {b.abs().max():.3g})"


# (input shape, in, out): the U-Net's inner levels at 256x256 (bottleneck 1x1, 2x2, 4x4, 8x8), batch 1 and > 1,
# row counts on both sides of GEMM_ROWS_FIRST_BELOW (the two matmul orientations).
CONVT_CASES = [((1, 512, 1, 1), 512, 512), ((1, 1024, 2, 2), 1024, 512), ((2, 1024, 4, 4), 1024, 512),
               ((1, 64, 4, 4), 64, 32), ((3, 32, 3, 3), 32, 16), ((4, 16, 8, 8), 16, 3)]
CONV_CASES = [((1, 512, 2, 2), 512, 512), ((2, 512, 4, 4), 512, 512), ((1, 512, 8, 8), 512, 512),
              ((4, 64, 4, 4), 64, 32), ((3, 6, 16, 16), 6, 16), ((1, 3, 9, 9), 3, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,cin,cout", CONVT_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_conv_transpose_matches_native(dtype, shape, cin, cout, bias):
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias).to(dtype)
    if bias:
        nn.init.normal_(m.bias)
    x = torch.randn(shape, dtype=dtype)
    _compare(m, lambda t: perf.gemm_conv_transpose2d(t, m.weight, m.bias, 2, 1), x)
    _compare(m, perf.GemmConvTranspose2d.from_native(copy.deepcopy(m), max_rows=10**9), x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,cin,cout", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_conv_matches_native(dtype, shape, cin, cout, bias):
    torch.manual_seed(0)
    m = nn.Conv2d(cin, cout, 4, 2, 1, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    _compare(m, lambda t: perf.gemm_conv2d(t, m.weight, m.bias, 2, 1), x)
    _compare(m, perf.GemmConv2d.from_native(copy.deepcopy(m), max_rows=10**9), x)


@pytest.mark.parametrize("k,s,p,d,op", [(3, 1, 1, 1, 0), (4, 1, 1, 1, 0), (3, 2, 0, 2, 1), (1, 1, 0, 1, 0),
                                        (5, 3, 2, 1, 2), ((3, 2), (2, 1), (1, 0), (1, 2), (1, 0))])
def test_gemm_general_geometry(k, s, p, d, op):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    ct = nn.ConvTranspose2d(5, 4, k, s, p, output_padding=op, dilation=d).double()
    _compare(ct, perf.GemmConvTranspose2d.from_native(copy.deepcopy(ct), max_rows=10**9), x)
    c = nn.Conv2d(5, 4, k, s, p, dilation=d).double()
    _compare(c, perf.GemmConv2d.from_native(copy.deepcopy(c), max_rows=10**9), x)


def test_gemm_unbatched_and_output_size():
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(8, 4, 3, 2, 1).double()
    g = perf.GemmConvTranspose2d.from_native(copy.deepcopy(ct))
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(g(x, output_size=[6, 6]), ct(x, output_size=[6, 6]))
    torch.testing.assert_close(g(x[0]), ct(x[0]))
    c = nn.Conv2d(8, 4, 3, 2, 1).double()
    torch.testing.assert_close(perf.GemmConv2d.from_native(copy.deepcopy(c))(x[0]), c(x[0]))


def test_rule_falls_back_to_native_for_many_rows():
    torch.manual_seed(0)
    m = perf.GemmConv2d.from_native(nn.Conv2d(3, 4, 4, 2, 1), max_rows=4)
    calls = []
    orig = perf._ConvGemm.apply
    perf._ConvGemm.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        m(torch.randn(1, 3, 4, 4))  # 2x2 output: 4 rows -> GEMM
        m(torch.randn(1, 3, 8, 8))  # 16 rows -> native
    finally:
        perf._ConvGemm.apply = orig
    assert len(calls) == 1


def _gen_and_grads(G, x, target):
    out = G(x)
    loss = (out - target).abs().mean() + out.square().mean()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in G.named_parameters()}


def test_whole_generator_same_output_and_gradients():
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=8, use_dropout=False).double()
    G2 = copy.deepcopy(G)
    keys = list(G2.state_dict())
    perf.apply_gemm_convs(G2)
    assert list(G2.state_dict()) == keys
    assert sum(isinstance(m, (perf.GemmConv2d, perf.GemmConvTranspose2d)) for m in G2.modules()) == 14
    x, target = torch.rand(2, 3, 128, 128, dtype=torch.float64) * 2 - 1, torch.rand(2, 3, 128, 128).double()
    ref, ref_g = _gen_and_grads(G, x, target)
    out, g = _gen_and_grads(G2, x, target)
    # Each layer's GEMM and oneDNN sums differ only in order (bounded per layer in the tests above). Rounding errors of
    # two summation orders differ like random walks, ~u sqrt(n) of a layer's scale (u = 2^-53, n <= 128*16 = 2048
    # products): ~5e-15 per layer, ~2e-14 over the 14 layers, on outputs and gradients of size <= 1. 1e-12 is 50x above
    # that on any CPU; a wrong layer is off by > 1e-4.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-9, atol=1e-12, msg=n)
    # batch-norm running statistics were updated identically
    for (n, a), (_, b) in zip(G.named_buffers(), G2.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    # float32, batch 1 (the plan for example_shape): the per-layer float32 bounds are checked above; this catches
    # plumbing mistakes, which are off by ~|out|. Random-walk estimate of two float32 evaluations' difference, taking
    # the most pessimistic case (every layer summing n = 2048 products one after the other): sqrt(2) u sqrt(n / 2) =
    # 2.7e-6 per layer (u = 2^-24), sqrt(14) x that = 1e-5 over the network, relative to the activations' scale;
    # 4 sigma over the outputs: 4e-5. So 1e-4 x max|out| (and 1e-3 of each gradient's max, backward through the same
    # layers plus batch norm at batch 1), whatever order this CPU's kernels sum in.
    G32 = build_generator("unet_128", ngf=8, use_dropout=False)
    G32g = perf.apply_gemm_convs(copy.deepcopy(G32), example_shape=(1, 3, 128, 128))
    x32 = torch.rand(1, 3, 128, 128) * 2 - 1
    ref, ref_g = _gen_and_grads(G32, x32, target[:1].float())
    out, g = _gen_and_grads(G32g, x32, target[:1].float())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    for n in ref_g:
        scale = ref_g[n].abs().max().item() or 1.0
        assert (g[n] - ref_g[n]).abs().max().item() <= 1e-3 * scale, n


def test_gemm_plan_and_remove():
    G = build_generator("unet_128", ngf=8)
    plan = {p["name"]: p["path"] for p in perf.gemm_plan(G, (1, 3, 128, 128))}
    # 128x128: down convs with <= 8x8 outputs and up convs with <= 8x8 inputs take the GEMM path, and so does the last
    # up conv (8->3 channels: few output columns)
    assert {n for n, p in plan.items() if p} == {"down.3", "down.4", "down.5", "down.6",
                                                 "up.0", "up.3", "up.4", "up.5", "up.6"}
    assert all(p in (None, "gemm") for p in plan.values())
    assert all(m.training for m in G.modules())  # the probe restored train mode
    perf.apply_gemm_convs(G, example_shape=(1, 3, 128, 128))
    assert type(G.down[2]) is nn.Conv2d and type(G.down[3]) is perf.GemmConv2d
    perf.remove_gemm_convs(G)
    assert all(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in list(G.down) + list(G.up))
    assert "gemm_max_rows" not in G.down[3].__dict__
    D = build_discriminator(ndf=8)
    dplan = {p["name"]: p["path"] for p in perf.gemm_plan(D, (1, 6, 128, 128))}
    assert dplan["model.11"] == "small_out" and dplan["model.0"] is None  # 64->1 conv: 16 output columns


SMALL_OUT_CASES = [((1, 512, 31, 31), 512, 1, 4, 1, 1), ((2, 64, 15, 15), 64, 1, 4, 1, 1),
                   ((1, 32, 64, 64), 32, 1, 1, 1, 0), ((3, 5, 9, 8), 5, 2, 3, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,cin,cout,k,s,p", SMALL_OUT_CASES)
def test_small_out_conv_matches_native(dtype, shape, cin, cout, k, s, p):
    """The PatchGAN's last conv (512->1) and the 1x1 PatchGAN's: the few-output-columns path."""
    torch.manual_seed(0)
    m = nn.Conv2d(cin, cout, k, s, p).to(dtype)
    g = perf.GemmConv2d.from_native(copy.deepcopy(m), max_rows=0)
    assert perf.gemm_path(g, shape) == "small_out"
    _compare(m, g, torch.randn(shape, dtype=dtype))


def test_training_transforms_cpu():
    cfg = Config(ModelConfig(netG="unet_128", ngf=8, ndf=8), train=TrainConfig())
    G, D = build_generator("unet_128", ngf=8), build_discriminator(ndf=8)
    keys_g, keys_d = list(G.state_dict()), list(D.state_dict())
    params = [id(p) for p in G.parameters()]
    G_run, D_run = perf.apply_training_transforms(G, D, cfg, "cpu")
    assert G_run is G and D_run is D
    assert isinstance(G.up[6], perf.GemmConvTranspose2d) and isinstance(D.model[0], perf.GemmConv2d)
    assert list(G.state_dict()) == keys_g and list(D.state_dict()) == keys_d
    assert [id(p) for p in G.parameters()] == params
    # bf16 autocast: the GEMM layers fall back to the native kernels
    m = nn.ConvTranspose2d(16, 8, 4, 2, 1)
    g = perf.GemmConvTranspose2d.from_native(copy.deepcopy(m))
    x = torch.randn(1, 16, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(g(x), m(x))


def test_channels_last_keeps_function():
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=4, use_dropout=False).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ref = G(x)
        out = perf.apply_channels_last(copy.deepcopy(G))(x.contiguous(memory_format=torch.channels_last))
    # oneDNN's NHWC and blocked kernels sum in other orders: the float32 random-walk estimate of
    # test_whole_generator_same_output_and_gradients, 4e-5 relative, on outputs of |out| < 0.05 here: 1e-5 is 5x that.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["packed", "gemm", "eager"])
@pytest.mark.parametrize("mode", ["eval", "paper"])
def test_optimize_for_inference_matches_eager(method, mode):
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=8)
    Gm = with_mode(G, mode, dropout=False)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    fast = perf.optimize_for_inference(G, (2, 3, 128, 128), method=method, mode=mode)
    # 1e-4 (also optimize_for_inference's own check): float32 summation-order differences, 4e-5 relative by the
    # random-walk estimate of test_whole_generator_same_output_and_gradients, on outputs |out| < 0.5.
    assert fast.method == method and fast.max_abs_err is not None and fast.max_abs_err <= 1e-4
    with torch.inference_mode():
        err = (fast(x) - Gm(x)).abs().max().item()
    assert err <= 1e-4
    assert list(G.state_dict()) == list(build_generator("unet_128", ngf=8).state_dict())  # G untouched


def test_optimize_for_inference_inductor():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    G = with_mode(build_generator("unet_128", ngf=4), "eval")
    fast = perf.optimize_for_inference(G, (1, 3, 128, 128))  # auto: inductor with freezing
    assert fast.method in ("inductor", "packed")  # packed only where inductor cannot build here
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        assert (fast(x) - G(x)).abs().max().item() <= 1e-4


def test_optimize_for_inference_bf16():
    pytest.importorskip("torch._inductor")
    if not perf.cpu_has_native_bf16():
        pytest.skip("CPU without native bf16")
    torch.manual_seed(0)
    G = with_mode(build_generator("unet_128", ngf=4), "eval")
    fast = perf.optimize_for_inference(G, (1, 3, 128, 128), precision="bf16")
    assert fast.method == "inductor" and fast.autocast == torch.bfloat16
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        y = fast(x)
        err = (y - G(x)).abs().max().item()
    # Whatever does the bf16 math (avx512_bf16 or AMX): each conv rounds its inputs and weights to bf16 (u = 2^-8) and
    # accumulates in float32, ~2u/sqrt(3) = 4.5e-3 relative per layer as a random walk, sqrt(14) x that = 1.7e-2 over
    # the network, on outputs |y| < 0.03 here: ~5e-4, 4 sigma 2e-3, so 1e-2 leaves room; optimize_for_inference's own
    # check (2.5e-2) is for trained weights, whose larger outputs drift more.
    assert y.dtype == torch.float32 and err <= 1e-2
    assert err > 0  # it really ran in bf16


def test_optimize_for_inference_rejects_train_mode_batchnorm():
    with pytest.raises(ValueError, match="with_mode"):
        perf.optimize_for_inference(build_generator("unet_128", ngf=4), (1, 3, 128, 128), method="eager")
