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
