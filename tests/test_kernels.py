"""Fused norm + activation kernels (fastp2p.kernels.norm_act).

On a machine without CUDA the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
any kernel import), so the shapes stay small; with CUDA the same tests run the compiled kernels on the GPU. Every kernel
output and scratch buffer is poisoned with NaN before each call (``poisoned_outputs``), so an element a kernel does not
write fails the comparison. The oracle is ``norm_act_reference`` run in float64 on the same (rounded) inputs.
"""

import copy

import pytest
import torch
from torch import nn

from fastp2p import kernels
from fastp2p.models import build_discriminator, build_generator
from fastp2p.models.unet import UnetGenerator

# (``from fastp2p.kernels import ...`` reads as third-party to ruff's isort: kernels/ is not under fastp2p/ on disk)
na = kernels.norm_act
FusedNormAct, apply_fused_kernels = kernels.FusedNormAct, kernels.apply_fused_kernels
norm_act_reference, remove_fused_kernels = kernels.norm_act_reference, kernels.remove_fused_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not na.triton_usable(DEVICE), reason="Triton not installed (or no CUDA and no "
                                  "TRITON_INTERPRET=1)")

# Max error over max(1, max |reference|), against float64 on the same (rounded) inputs. bf16 / fp16 storage rounds
# outputs to 8 / 11 significant bits: < 2^-7 = 7.8e-3 relative for bf16 (the Triton interpreter converts float32 to
# bf16 by truncation; GPUs round to nearest, 2^-8), 2^-11 = 4.9e-4 for fp16. float32: the statistics and backward sums
# here run over <= 512 values per channel; as a random walk their rounding is ~2^-24 sqrt(512) = 1.4e-6 of the terms'
# scale, and the normalization multiplies it by |x_hat| (< 5): 2e-5 is ~3x above, whatever the summation order (on a
# CPU the interpreter sums with numpy, in an order that does not depend on the CPU's SIMD features).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CL = torch.channels_last

SHAPES = [
    pytest.param((1, 512, 1, 1), id="1x512x1x1-unet-bottleneck"),
    pytest.param((1, 512, 2, 2), id="1x512x2x2-unet-innermost-norm"),
    pytest.param((2, 5, 7, 3), id="2x5x7x3-odd-hw-batch2"),
    pytest.param((3, 70, 5, 9), id="3x70x5x9-c-not-multiple-of-block"),
    pytest.param((2, 16, 16, 16), id="2x16x16x16-several-tiles"),
]


def _err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return ((actual.double() - ref.double()).abs().max() / max(1.0, ref.abs().max().item())).item()


def _inputs(shape, dtype, fmt, offset=0.0):
    N, C, H, W = shape
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5 + offset).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(C, device=DEVICE) * 0.5 + 1
    b = torch.randn(C, device=DEVICE) * 0.5
    rm = torch.randn(C, device=DEVICE)
    rv = torch.rand(C, device=DEVICE) + 0.5
    return x, dy, w, b, rm, rv


def _run_op(x, dy, w, b, rm, rv, stats, act, registration="custom_op", variant="v1"):
    op = na.REGISTRATIONS[registration]
    if variant == "v2":  # same outputs; the extra arguments (running statistics to update) are left out here
        def op(x, w, b, m, v, *conf, _op=na.REGISTRATIONS_V2[registration]):
            return _op(x, w, b, m, v, None, None, None, *conf, 0.1, False)
    x = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    w = None if w is None else w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    running = stats == "running"
    with na.poisoned_outputs():
        y, mean, var = op(x, w, b, rm if running else None, rv if running else None, stats, act, 1e-5, 0.2)
        y.backward(dy)
    return y, mean, var, x.grad, None if w is None else w.grad, None if b is None else b.grad


def _run_ref(x, dy, w, b, rm, rv, stats, act):
    x = x.detach().double().requires_grad_(True)
    w = None if w is None else w.detach().double().requires_grad_(True)
    b = None if b is None else b.detach().double().requires_grad_(True)
    y, mean, var = norm_act_reference(x, w, b, rm.double(), rv.double(), stats, act, 1e-5, 0.2)
    y.backward(dy.double())
    return y, mean, var, x.grad, None if w is None else w.grad, None if b is None else b.grad


def _check(shape, stats, act, dtype=torch.float32, fmt=torch.contiguous_format, affine=True, offset=0.0,
           registration="custom_op", variant="v1"):
    x, dy, w, b, rm, rv = _inputs(shape, dtype, fmt, offset)
    if not affine:
        w = b = None
    got = _run_op(x, dy, w, b, rm, rv, stats, act, registration, variant)
    ref = _run_ref(x, dy, w, b, rm, rv, stats, act)
    names = ("y", "mean", "var", "dx", "dweight", "dbias")
    for name, g, r in zip(names, got, ref, strict=True):
        if r is None:
            assert g is None, name
            continue
        e = _err(g, r)
        assert e <= TOL[dtype], f"{name}: error {e:.2e} > {TOL[dtype]:.0e} ({shape}, {stats}, {act}, {dtype})"
    y, dx = got[0], got[3]
    assert y.dtype == dtype and dx.dtype == dtype
    for t in (y, dx):  # the memory format is kept, not silently turned into NCHW
        assert t.is_contiguous(memory_format=fmt)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    return got


# -- the op against the float64 reference --------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stats,act", [("batch", "leaky_relu"), ("instance", "relu"), ("running", "leaky_relu")])
@pytest.mark.parametrize("shape", SHAPES)
def test_edge_shapes_fp32(shape, stats, act, fmt):
    _check(shape, stats, act, fmt=fmt)


@needs_triton
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_edge_shapes_fp32_v2_batch(shape, fmt):
    """v2's in-kernel merges (forward statistics, backward sums) at the edge shapes, batch statistics."""
    _check(shape, "batch", "leaky_relu", fmt=fmt, variant="v2")


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("stats", ["batch", "instance", "running"])
def test_every_activation_and_mode(stats, act, affine, variant):
    _check((2, 6, 5, 3), stats, act, affine=affine, fmt=CL if affine else torch.contiguous_format, variant=variant)


@needs_triton
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stats", ["batch", "instance", "running"])
def test_half_storage_fp32_accumulation(stats, dtype, fmt):
    _check((2, 12, 6, 5), stats, "leaky_relu", dtype=dtype, fmt=fmt)


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_multi_chunk_paths(stats, fmt, variant):
    """Partial statistics + merge + apply (forward) and partial sums + apply (backward), which the interpreter's
    default one-chunk-per-sample config skips: force several chunks, with a ragged last one and partial channel
    blocks."""
    with na.override_config(chunk=8, block_l=4, block_c=4):
        _check((2, 6, 5, 5), stats, "leaky_relu", fmt=fmt, variant=variant)


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("chunk", [None, 1024], ids=["one-chunk", "chunks-of-1024"])
def test_statistics_stable_for_large_hw_and_mean(chunk, variant):
    """Mean 1000, std 1, 16384 positions per channel: E[x^2] - E[x]^2 in fp32 would lose the variance (~6% error);
    the tile-wise two-pass + Chan merge keeps it to fp32 rounding of the mean."""
    shape = (1, 4, 128, 128)
    x = (torch.randn(shape, device=DEVICE, dtype=torch.float64) + 1000).float()
    cfg = {} if chunk is None else {"chunk": chunk}
    with na.poisoned_outputs(), na.override_config(**cfg):
        for stats in ("instance", "batch"):
            if variant == "v1":
                y, mean, var = torch.ops.fastp2p.norm_act_fwd(x, None, None, None, None, stats, "none", 1e-5, 0.2)
            else:
                y, mean, var = torch.ops.fastp2p.norm_act_fwd2(x, None, None, None, None, None, None, None, stats,
                                                               "none", 1e-5, 0.2, 0.1, False)
            yr, mr, vr = norm_act_reference(x.double(), stats=stats)
            assert _err(var, vr) < 1e-4
            assert (mean.double() - mr).abs().max() < 1e-3
            assert _err(y, yr) < 1e-3


@needs_triton
def test_gradient_in_the_other_memory_format_and_strided_input():
    """dy may arrive NCHW for an NHWC x (and the reverse); a non-dense x is made dense in its own format."""
    shape = (2, 8, 5, 6)
    x, dy, w, b, rm, rv = _inputs(shape, torch.float32, CL)
    got = _run_op(x, dy.contiguous(), w, b, rm, rv, "batch", "leaky_relu")
    ref = _run_ref(x, dy, w, b, rm, rv, "batch", "leaky_relu")
    assert got[0].is_contiguous(memory_format=CL) and got[3].is_contiguous(memory_format=CL)
    for g, r in zip(got, ref, strict=True):
        assert _err(g, r) <= TOL[torch.float32]
    big = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=CL)
    xs = big[:, ::2]  # channels-last strides, not dense
    y, _, _ = torch.ops.fastp2p.norm_act_fwd(xs, None, None, None, None, "instance", "relu", 1e-5, 0.2)
    assert y.is_contiguous(memory_format=CL)
    assert _err(y, norm_act_reference(xs.double(), stats="instance", act="relu")[0]) <= TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_triton_op_registration_eager(variant):
    got = _check((2, 6, 4, 3), "batch", "leaky_relu", fmt=CL, registration="triton_op", variant=variant)
    assert got[0] is not None


@needs_triton
def test_opcheck_custom_op():
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastp2p.norm_act_fwd, (x, w, b, None, None, "batch", "leaky_relu", 1e-5, 0.2))


@needs_triton
def test_opcheck_v2_ops():
    """fwd2 mutates the running statistics it is given (schema, fake and functionalization checks); bwd2 is pure."""
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
    torch.library.opcheck(torch.ops.fastp2p.norm_act_fwd2,
                          (x, w, b, None, None, rm, rv, nbt, "batch", "leaky_relu", 1e-5, 0.2, 0.0, True))
    _, mean, var = torch.ops.fastp2p.norm_act_fwd(x, w, b, None, None, "batch", "leaky_relu", 1e-5, 0.2)
    torch.library.opcheck(torch.ops.fastp2p.norm_act_bwd2,
                          (torch.randn_like(x), x, w, b, mean, var, "batch", "leaky_relu", 1e-5, 0.2))


# -- the module ------------------------------------------------------------------------------------------------------
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_batchnorm_running_stats_like_nn_batchnorm(backend, momentum):
    bn = nn.BatchNorm2d(6, momentum=momentum).to(DEVICE)
    nn.init.normal_(bn.weight, 1, 0.3)
    ref = nn.Sequential(copy.deepcopy(bn), nn.LeakyReLU(0.2))
    fused = FusedNormAct(bn, "leaky_relu", 0.2, backend)
    for _ in range(3):
        x = torch.randn(3, 6, 4, 5, device=DEVICE) * 3 + 2
        torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        # Two float32 variances of the same n = 3*4*5 = 60 values, by other algorithms (Chan merge vs ATen's Welford,
        # whose vector width depends on the CPU): each within ~(n + 3) 2^-24 = 3.8e-6 of the exact one (relative, the
        # data's mean ~ its std here), so rtol 1e-5. Biased instead of unbiased variance would be off by 1/59 = 1.7%.
        torch.testing.assert_close(getattr(bn, name), getattr(ref[0], name), atol=1e-6, rtol=1e-5)
    fused.eval()
    ref.eval()
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    assert bn.num_batches_tracked.item() == 3  # eval does not count


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_refuses_what_pytorch_refuses(backend):
    bn = FusedNormAct(nn.BatchNorm2d(4), "relu", backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4, 1, 1, device=DEVICE))
    bn.eval()
    assert bn(torch.randn(1, 4, 1, 1, device=DEVICE)).shape == (1, 4, 1, 1)  # eval at the bottleneck is fine
    inorm = FusedNormAct(nn.InstanceNorm2d(4), backend=backend)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        inorm(torch.randn(2, 4, 1, 1, device=DEVICE))


def test_module_shares_the_norms_tensors_and_keys():
    bn = nn.BatchNorm2d(5)
    f = FusedNormAct(bn, "leaky_relu", backend="torch")
    assert f.weight is bn.weight and f.bias is bn.bias and f.running_mean is bn.running_mean
    assert list(f.state_dict()) == list(bn.state_dict())
    sd = bn.state_dict()
    del sd["num_batches_tracked"]  # from before the count existed (version 1): loads, as into nn.BatchNorm2d
    sd._metadata[""]["version"] = 1
    f.load_state_dict(sd)
    nn.BatchNorm2d(5).load_state_dict(sd)
    inorm = FusedNormAct(nn.InstanceNorm2d(5), backend="torch")
    assert list(inorm.state_dict()) == [] and inorm.weight is None


def _small_g(norm: str) -> nn.Module:
    g = UnetGenerator(3, 3, num_downs=5, ngf=4, norm=norm, use_dropout=False)
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    return g.to(DEVICE)


def _assert_grads_close(got: dict, ref: dict, exact: bool = False) -> None:
    """Per-tensor tolerance 1e-4 of its own scale, floored at 1e-6 of the largest gradient: a conv bias right before an
    instance norm has a gradient that is zero up to rounding."""
    floor = 1e-2 * max(r.abs().max().item() for r in ref.values())
    for k, r in ref.items():
        if exact:
            assert torch.equal(got[k], r), k
            continue
        err = (got[k] - r).abs().max().item()
        assert err <= 1e-4 * max(r.abs().max().item(), floor), f"{k}: max error {err:.2e}"


def _fwd_bwd(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y - target).square().mean().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "norm,fmt", [("batch", "nchw"), ("batch", "nhwc"), ("instance", "nchw")],
)
def test_generator_fused_equals_unfused(norm, fmt, backend):
    torch.manual_seed(0)
    g = _small_g(norm)
    fused = apply_fused_kernels(copy.deepcopy(g), backend)
    assert list(fused.state_dict()) == list(g.state_dict())
    kinds = {name: m.act for name, m in fused.named_modules() if isinstance(m, FusedNormAct)}
    n_norms = sum(1 for m in g.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)))
    assert len(kinds) == n_norms
    assert kinds["down_norm.1"] == "leaky_relu" and kinds["up_norm.1"] == "none"
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    target = torch.randn(2, 3, 32, 32, device=DEVICE)
    if fmt == "nhwc":
        g, fused, x = g.to(memory_format=CL), fused.to(memory_format=CL), x.contiguous(memory_format=CL)
    with na.poisoned_outputs():
        y_f, gx_f, grads_f = _fwd_bwd(fused, x, target)
    y_r, gx_r, grads_r = _fwd_bwd(g, x, target)
    exact = backend == "torch" and norm == "batch"
    tol = dict(atol=0, rtol=0) if exact else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y_f, y_r, **tol)
    torch.testing.assert_close(gx_f, gx_r, **(tol if exact else dict(atol=1e-6, rtol=1e-3)))
    _assert_grads_close(grads_f, grads_r, exact)
    for k, v in g.state_dict().items():  # running statistics moved the same way
        torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("netD,norm", [("basic", "batch"), ("pixel", "batch"), ("basic", "instance")])
def test_discriminator_fused_equals_unfused(netD, norm, backend):
    torch.manual_seed(0)
    d = build_discriminator(netD, 6, ndf=4, norm=norm).to(DEVICE)
    fused = apply_fused_kernels(copy.deepcopy(d), backend)
    assert list(fused.state_dict()) == list(d.state_dict())
    seq = fused.model if netD == "basic" else fused.net
    pairs = [(i, m.act) for i, m in enumerate(seq) if isinstance(m, FusedNormAct)]
    assert pairs and all(act == "leaky_relu" and isinstance(seq[i + 1], nn.Identity) for i, act in pairs)
    x = torch.randn(2, 6, 32, 32, device=DEVICE)
    target = torch.randn(2, 1, 2, 2, device=DEVICE) if netD == "basic" else torch.randn(2, 1, 32, 32, device=DEVICE)
    with na.poisoned_outputs():
        y_f, gx_f, grads_f = _fwd_bwd(fused, x, target)
    y_r, gx_r, grads_r = _fwd_bwd(d, x, target)
    torch.testing.assert_close(y_f, y_r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-6, rtol=1e-3)
    _assert_grads_close(grads_f, grads_r)


def test_apply_and_remove_round_trip_and_backend_switch():
    g = build_generator("unet_128", ngf=4, norm="batch")
    d = build_discriminator("basic", 6, ndf=4)
    for model in (g, d):
        before = [(n, type(m)) for n, m in model.named_modules()]
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        apply_fused_kernels(model, "torch")
        assert any(isinstance(m, FusedNormAct) for m in model.modules())
        apply_fused_kernels(model, "torch")  # idempotent
        assert all(m.backend == "torch" for m in model.modules() if isinstance(m, FusedNormAct))
        model.float()  # buffers replaced by .to(): removal must pick up the new tensors
        remove_fused_kernels(model)
        assert [(n, type(m)) for n, m in model.named_modules()] == before
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, sd[k])


def test_round_trip_of_the_down_activation_modules():
    g = UnetGenerator(3, 3, num_downs=5, ngf=4)
    apply_fused_kernels(g, "torch")
    assert isinstance(g.down_act[1], nn.Identity) and g.down_norm[1].act == "leaky_relu"
    remove_fused_kernels(g)
    assert isinstance(g.down_act[1], nn.LeakyReLU) and isinstance(g.down_norm[1], nn.BatchNorm2d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_mode_per_sample_batchnorm(backend):
    from fastp2p.inference import with_mode

    torch.manual_seed(0)
    g = with_mode(_small_g("batch"), "paper", dropout=False)
    fused = apply_fused_kernels(copy.deepcopy(g), backend)
    assert fused.down_norm[1].kind == "per_sample_batch" and fused.down_norm[1].act == "leaky_relu"
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), g(x), atol=2e-5, rtol=1e-4)


# -- torch.compile through the custom op -----------------------------------------------------------------------------
@needs_triton
def test_compile_fullgraph_aot_eager_discriminator():
    torch.manual_seed(0)
    d = build_discriminator("basic", 6, ndf=4).to(DEVICE)
    fused = apply_fused_kernels(copy.deepcopy(d), "triton")
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 32, 32, device=DEVICE)
    target = torch.randn(2, 1, 2, 2, device=DEVICE)
    y_c, gx_c, grads_c = _fwd_bwd(compiled, x, target)
    y_r, gx_r, grads_r = _fwd_bwd(d, x, target)
    torch.testing.assert_close(y_c, y_r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx_r, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(fused.model[3].running_var, d.model[3].running_var, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own
def test_compile_fullgraph_inductor_module():
    torch._dynamo.reset()
    bn = nn.BatchNorm2d(8).to(DEVICE)
    ref = nn.Sequential(copy.deepcopy(bn), nn.LeakyReLU(0.2))
    compiled = torch.compile(FusedNormAct(bn, "leaky_relu"), backend="inductor", fullgraph=True)
    x = torch.randn(2, 8, 5, 4, device=DEVICE).contiguous(memory_format=CL)
    y_c, gx_c, _ = _fwd_bwd(compiled, x, torch.zeros_like(x))
    y_r, gx_r, _ = _fwd_bwd(ref, x, torch.zeros_like(x))
    torch.testing.assert_close(y_c, y_r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx_r, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(bn.running_mean, ref[0].running_mean, atol=1e-6, rtol=1e-5)


# -- the benchmark entry point -----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA this would run the full benchmark")
def test_bench_says_it_needs_a_gpu(capsys):
    from fastp2p.bench import kernels as bench

    assert bench.main([]) == 0
    assert "needs a GPU" in capsys.readouterr().out
