"""The U-Net skip path transform (fastp2p.kernels.unet_skip): ReLU(cat[a, u]) written once into a preallocated buffer.

The transform runs the same float ops on the same values as the plain model (the buffer's contents are ReLU(a) and
ReLU(u) either way; the backward is torch.relu's own threshold_backward, sliced as cat's backward slices), so in float64
the outputs, every gradient and the running statistics must be equal exactly, not just close.
"""

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastp2p import kernels, perf
from fastp2p.config import Config, ModelConfig, TrainConfig
from fastp2p.models import build_discriminator, build_generator
from fastp2p.models.unet import UnetGenerator

us = kernels.unet_skip
CL = torch.channels_last


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _run(g, x, seed=1):
    """Forward + backward of a fixed random projection of the output; (y, dx, {param: grad}, {buffer: value})."""
    x = x.detach().clone().requires_grad_(True)
    g.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks: the same RNG state for both models
    y = g(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in g.named_parameters()}, dict(g.named_buffers())


def _assert_same(a, b):
    ya, gxa, pa, ba = a
    yb, gxb, pb, bb = b
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(gxa, gxb, rtol=0, atol=0)
    assert pa.keys() == pb.keys() and all(v is not None for v in pa.values())
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_relu_cat_equals_cat_then_relu(fmt):
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=fmt)
    u = torch.randn(2, 4, 4, 5, dtype=torch.float64).to(memory_format=fmt)
    a[0, 0, 0, :2] = 0.0  # relu'(0) = 0 on both sides
    a[1, 1, 1, 1] = float("nan")  # propagated like torch.relu
    a1, u1 = a.clone().requires_grad_(True), u.clone().requires_grad_(True)
    a2, u2 = a.clone().requires_grad_(True), u.clone().requires_grad_(True)
    out = us.relu_cat(a1, u1)
    ref = us.relu_cat_reference(a2, u2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=0)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="relu_cat"):
        us.relu_cat(a, u[:, :, :2])


@pytest.mark.parametrize("norm,dropout", [("batch", False), ("batch", True), ("instance", False)])
def test_transformed_unet_equals_plain_float64(norm, dropout):
    torch.manual_seed(0)
    plain = build_generator("unet_128", 3, 3, 2, norm, dropout).double().train()
    fused = kernels.apply_fused_skips(copy.deepcopy(plain))
    assert type(fused) is kernels.FusedSkipUnetGenerator
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    _assert_same(_run(fused, x), _run(plain, x))


def test_composes_with_fused_norm_kernels_torch_backend_channels_last():
    torch.manual_seed(0)
    plain = UnetGenerator(3, 3, num_downs=5, ngf=2).double().to(memory_format=CL)
    fused = kernels.apply_fused_skips(kernels.apply_fused_kernels(copy.deepcopy(plain), "torch"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=CL)
    seen = []
    for m in fused.up:
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(memory_format=CL)))
    _assert_same(_run(fused, x), _run(plain, x))
    assert seen and all(seen)  # every up conv's input (the buffers included) stayed channels-last


def test_no_cat_and_fewer_relus_run():
    torch.manual_seed(0)
    plain = UnetGenerator(3, 3, num_downs=5, ngf=2)
    fused = kernels.apply_fused_skips(copy.deepcopy(plain))
    x = torch.randn(1, 3, 32, 32)
    logs = {}
    for name, g in (("plain", plain), ("fused", fused)):
        with _OpLog() as log:
            g(x).sum().backward()
        logs[name] = log.ops
    levels = plain.num_downs - 1  # one cat + ReLU per level above the innermost
    assert logs["plain"].count("cat") == levels and logs["fused"].count("cat") == 0
    assert logs["fused"].count("relu") == logs["plain"].count("relu") - levels == 1  # the innermost ReLU(h_n) stays
    # backward: one threshold_backward per ReLU either way (no extra passes there)
    assert logs["fused"].count("threshold_backward") == logs["plain"].count("threshold_backward")


def test_compile_fullgraph_aot_eager():
    # under compile the Function falls back to relu(cat) (dynamo refuses out= into a strided view; inductor fuses them)
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = UnetGenerator(3, 3, num_downs=5, ngf=2)
    fused = kernels.apply_fused_skips(copy.deepcopy(plain))
    x = torch.randn(2, 3, 32, 32)
    y_c, gx_c, grads_c, _ = _run(torch.compile(fused, backend="aot_eager", fullgraph=True), x)
    y_r, gx_r, grads_r, _ = _run(plain, x)
    torch.testing.assert_close(y_c, y_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx_c, gx_r, atol=1e-6, rtol=1e-5)
    for k in grads_r:
        torch.testing.assert_close(grads_c["_orig_mod." + k], grads_r[k], atol=1e-6, rtol=1e-5, msg=k)


def test_state_dict_keys_checkpoints_and_round_trip():
    plain = UnetGenerator(3, 3, num_downs=5, ngf=2)
    sd = plain.state_dict()
    fused = kernels.apply_fused_skips(copy.deepcopy(plain))
    assert list(fused.state_dict()) == list(sd)
    fresh = kernels.apply_fused_skips(UnetGenerator(3, 3, num_downs=5, ngf=2))
    fresh.load_state_dict(sd)  # a plain checkpoint into a transformed model ...
    UnetGenerator(3, 3, num_downs=5, ngf=2).load_state_dict(fresh.state_dict())  # ... and back
    back = pickle.loads(pickle.dumps(fused))  # the class is importable: pickles (and deepcopies) as it is
    assert type(back) is kernels.FusedSkipUnetGenerator
    assert type(kernels.remove_fused_skips(fused)) is UnetGenerator
    kernels.apply_fused_skips(fused)
    kernels.apply_fused_skips(fused)  # idempotent
    assert type(fused) is kernels.FusedSkipUnetGenerator


def test_training_transforms_opt_in(monkeypatch):
    cfg = Config(ModelConfig(netG="unet_128", ngf=2, ndf=2), train=TrainConfig(kernels="torch"))
    for env, want in (("", UnetGenerator), ("1", kernels.FusedSkipUnetGenerator)):
        monkeypatch.setenv("FASTP2P_FUSED_SKIPS", env)
        G = build_generator("unet_128", ngf=2)
        perf.apply_training_transforms(G, build_discriminator(ndf=2), cfg, "cpu")
        assert type(G) is want


@pytest.mark.skipif(not kernels.norm_act.triton_usable("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="Triton not installed (or no CUDA and no TRITON_INTERPRET=1)")
def test_composes_with_triton_kernels():
    # The transform is exact on top of whatever norms the model holds: Triton (interpreted on a CPU) with and without it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = kernels.apply_fused_kernels(UnetGenerator(3, 3, num_downs=5, ngf=2, norm="batch").to(device), "triton")
    fused = kernels.apply_fused_skips(copy.deepcopy(base))
    x = torch.randn(2, 3, 32, 32, device=device)
    _assert_same(_run(fused, x), _run(base, x))


# ---------------------------------------------------------------------------------------------------------------------
# norm_writes: the up norms' Triton kernels write ReLU(u) into the join buffer themselves
# ---------------------------------------------------------------------------------------------------------------------
_TRITON = kernels.norm_act.triton_usable("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not _TRITON, reason="Triton not installed (or no CUDA and no TRITON_INTERPRET=1)")
_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_unet(num_downs=5, norm="batch", dropout=False, variant="v2", fmt=torch.contiguous_format):
    torch.manual_seed(0)
    g = UnetGenerator(3, 3, num_downs=num_downs, ngf=2, norm=norm, use_dropout=dropout).to(_DEV)
    return kernels.apply_fused_kernels(g, "triton", variant=variant).to(memory_format=fmt)


def _clamps(g, x, seed=5) -> int:
    torch.manual_seed(seed)  # the same dropout masks for every model counted
    with _OpLog() as log:
        g(x).sum().backward()
    return log.ops.count("clamp_min")


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("norm,fmt", [("batch", torch.contiguous_format), ("batch", CL), ("instance", CL)],
                         ids=["batch-nchw", "batch-nhwc", "instance-nhwc"])
def test_norm_writes_equal_relu_cat_path_bit_for_bit(variant, norm, fmt):
    # Same kernels, same config (it depends on x only), so the same fp32 values: relu(round(z)) == round(relu(z)) in
    # the buffer, and backward (z > 0) * dy == threshold_backward(dy, relu(z)) feeds the same reductions. Poisoned
    # buffers: a slice element nobody wrote would be NaN.
    base = _triton_unet(norm=norm, variant=variant, fmt=fmt)
    relu_cat = kernels.apply_fused_skips(copy.deepcopy(base))
    writes = kernels.apply_fused_skips(copy.deepcopy(base), norm_writes=True)
    x = torch.randn(2, 3, 32, 32, device=_DEV).to(memory_format=fmt)
    with kernels.norm_act.poisoned_outputs():
        _assert_same(_run(writes, x), _run(relu_cat, x))
        _assert_same(_run(writes, x), _run(relu_cat, x))  # second step: running statistics moved alike again
    # every one of the 4 join levels took the norm write: one clamp (the skip's) per level instead of two
    assert _clamps(relu_cat, x) == 8 and _clamps(writes, x) == 4
    with kernels.norm_act.counted_launches() as a:
        relu_cat(x)
    with kernels.norm_act.counted_launches() as b:
        writes(x)
    assert a == b  # the same kernel launches, nothing extra


@needs_triton
def test_norm_writes_skip_dropout_levels_in_training_only():
    base = _triton_unet(num_downs=6, dropout=True)  # dropout on up level 4 (a 2x2 level here)
    relu_cat = kernels.apply_fused_skips(copy.deepcopy(base))
    writes = kernels.apply_fused_skips(copy.deepcopy(base), norm_writes=True)
    x = torch.randn(2, 3, 64, 64, device=_DEV)
    _assert_same(_run(writes, x, seed=3), _run(relu_cat, x, seed=3))  # the same dropout masks: same RNG order
    # 5 join levels; the one after the dropout level joins by relu_cat (both step, keeping running statistics equal)
    assert _clamps(writes, x) == 4 * 1 + 2 and _clamps(relu_cat, x) == 5 * 2
    for g in (relu_cat, writes):
        g.eval()
    with torch.no_grad():
        torch.testing.assert_close(writes(x), relu_cat(x), rtol=0, atol=0)
    assert _clamps(writes, x) == 5  # eval: dropout is the identity, every level writes


@needs_triton
def test_norm_writes_leave_hooked_norms_alone():
    # distillation taps up_norm outputs with forward hooks: a hooked norm must still be called
    base = _triton_unet()
    writes = kernels.apply_fused_skips(copy.deepcopy(base), norm_writes=True)
    seen = []
    writes.up_norm[2].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    x = torch.randn(2, 3, 32, 32, device=_DEV)
    _assert_same(_run(writes, x), _run(kernels.apply_fused_skips(copy.deepcopy(base)), x))
    assert seen == [(2, 4, 8, 8)]
    assert _clamps(writes, x) == 3 + 2


def test_norm_writes_fall_back_without_triton_norms_and_under_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = UnetGenerator(3, 3, num_downs=5, ngf=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for g in (kernels.apply_fused_skips(copy.deepcopy(plain), norm_writes=True),
              kernels.apply_fused_skips(kernels.apply_fused_kernels(copy.deepcopy(plain), "torch"), norm_writes=True)):
        assert g.norm_writes
        _assert_same(_run(g, x), _run(copy.deepcopy(plain), x))
    g = kernels.apply_fused_skips(copy.deepcopy(plain).float(), norm_writes=True)
    y_c, gx_c, _, _ = _run(torch.compile(g, backend="aot_eager", fullgraph=True), x.float())
    y_r, gx_r, _, _ = _run(plain.float(), x.float())
    torch.testing.assert_close(y_c, y_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx_c, gx_r, atol=1e-6, rtol=1e-5)
    assert type(kernels.remove_fused_skips(g)) is UnetGenerator and "norm_writes" not in vars(g)
    back = pickle.loads(pickle.dumps(kernels.apply_fused_skips(g, norm_writes=True)))
    assert back.norm_writes


@needs_triton
def test_forward_out_and_sliced_dy_checked_and_exact():
    na = kernels.norm_act
    x = torch.randn(2, 3, 4, 5, device=_DEV)
    y, mean, var = na.norm_act_forward_v2(x, None, None, None, None, None, None, None, "batch", "relu", 1e-5, 0.2,
                                          0.1, False)
    buf = torch.full((2, 7, 4, 5), 7.0, device=_DEV)
    out = buf[:, 2:5]
    y2, _, _ = na.norm_act_forward_v2(x, None, None, None, None, None, None, None, "batch", "relu", 1e-5, 0.2, 0.1,
                                      False, out=out)
    assert y2.data_ptr() == out.data_ptr()
    torch.testing.assert_close(buf[:, 2:5], y, rtol=0, atol=0)
    assert (buf[:, :2] == 7).all() and (buf[:, 5:] == 7).all()  # nothing outside the slice touched
    g = torch.randn(2, 7, 4, 5, device=_DEV)
    sliced = na.norm_act_backward_v2(g[:, 2:5], x, None, None, mean, var, "batch", "relu", 1e-5, 0.2)
    dense = na.norm_act_backward_v2(g[:, 2:5].contiguous(), x, None, None, mean, var, "batch", "relu", 1e-5, 0.2)
    for s, d in zip(sliced, dense, strict=True):
        torch.testing.assert_close(s, d, rtol=0, atol=0)
    for bad in (buf[:, :2], buf[:, 2:5].to(torch.float64), torch.zeros(2, 3, 4, 1, device=_DEV).expand(2, 3, 4, 5)):
        with pytest.raises(ValueError, match="out="):
            na.norm_act_forward_triton(x, None, None, None, None, "batch", "relu", 1e-5, 0.2, out=bad)


def test_fused_skips_env_modes(monkeypatch):
    cfg = Config(ModelConfig(netG="unet_128", ngf=2, ndf=2), train=TrainConfig(kernels="torch"))
    for env, want in (("", None), ("0", None), ("1", False), ("relu_cat", False), ("norm", True)):
        monkeypatch.setenv("FASTP2P_FUSED_SKIPS", env)
        G = build_generator("unet_128", ngf=2)
        perf.apply_training_transforms(G, build_discriminator(ndf=2), cfg, "cpu")
        assert (type(G) is UnetGenerator) if want is None else (G.norm_writes is want)
    from fastp2p.errors import UserError

    monkeypatch.setenv("FASTP2P_FUSED_SKIPS", "yes")
    with pytest.raises(UserError, match="FASTP2P_FUSED_SKIPS='yes'"):
        perf.fused_skips_mode()
