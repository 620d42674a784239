"""Launch counts, host syncs and running statistics of the fused norm + activation kernels (fastp2p.kernels.norm_act).

Every Triton launch goes through ``norm_act._launch``; the tests wrap it to count launches per module forward and
backward. A host sync on a GPU shows on a CPU as a Python-level read of a tensor's value (``.item()``, ``float(t)``,
``int(t)``, ``bool(t)``, ``.tolist()``): those are made to raise during the module's forward/backward (outside the
launches themselves, where the Triton interpreter legitimately converts tensors to numpy).
"""

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fastp2p import kernels

na = kernels.norm_act
FusedNormAct = kernels.FusedNormAct
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not na.triton_usable(DEVICE), reason="Triton not installed (or no CUDA and no "
                                "TRITON_INTERPRET=1)")

# Positions per program 16, so (2, 8, 8, 8) runs 4 chunks per sample and 2 channel blocks: the multi-program merges.
MULTI = dict(chunk=16, block_l=8, block_c=4)


class HostSync(AssertionError):
    pass


class _Probe:
    """Counts Triton launches (kernel names, in order) and, while ``guard`` is on, raises HostSync on any Python-level
    read of a tensor's value outside a launch."""

    SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        self.guard = False
        self._in_launch = False
        real_launch = na._launch
        for name in self.SYNCS:
            orig = getattr(torch.Tensor, name)

            def check(t, *a, _orig=orig, _name=name, **k):
                if self.guard and not self._in_launch:
                    raise HostSync(f"host sync: Tensor.{_name} during the module's forward/backward")
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, check)

        probe = self

        def launch(kernel, wrap):
            grid_fn = real_launch(kernel, wrap)

            class _Grid:
                def __getitem__(self, grid):
                    run = grid_fn[grid]

                    def call(*args, **kw):
                        probe.names.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
                        probe._in_launch = True
                        try:
                            with _disable_current_modes():  # the interpreter's own tensor ops are not ours
                                return run(*args, **kw)
                        finally:
                            probe._in_launch = False

                    return call

            return _Grid()

        monkeypatch.setattr(na, "_launch", launch)

    @contextlib.contextmanager
    def counting(self):
        self.names.clear()
        self.guard = True
        try:
            yield self.names
        finally:
            self.guard = False


@pytest.fixture
def probe(monkeypatch):
    return _Probe(monkeypatch)


class _Ops(TorchDispatchMode):
    """The aten / custom ops run (outside the Triton launches)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def _module(kind: str, variant: str, momentum=0.1) -> FusedNormAct:
    norm = nn.BatchNorm2d(8, momentum=momentum) if kind == "batch" else nn.InstanceNorm2d(8, affine=True)
    return FusedNormAct(norm.to(DEVICE), "leaky_relu", 0.2, "triton", variant=variant)


def _fwd_bwd_counts(probe, mod, x):
    x = x.detach().clone().requires_grad_(True)
    with probe.counting() as names:
        y = mod(x)
    fwd = list(names)
    with probe.counting() as names:
        y.backward(torch.ones_like(y))
    return fwd, list(names)


@pytest.mark.parametrize("cfg", [{}, MULTI], ids=["one-chunk", "multi-chunk"])
@pytest.mark.parametrize("mode", ["batch-train", "batch-cumulative", "batch-eval", "instance"])
def test_v2_launches_and_no_host_sync(probe, mode, cfg):
    kind = "instance" if mode == "instance" else "batch"
    mod = _module(kind, "v2", momentum=None if mode == "batch-cumulative" else 0.1)
    if mode == "batch-eval":
        mod.eval()
    x = torch.randn(2, 8, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with na.override_config(**cfg):
        fwd, bwd = _fwd_bwd_counts(probe, mod, x)
    assert 1 <= len(fwd) <= 2 and 1 <= len(bwd) <= 2, (fwd, bwd)
    if mode == "batch-eval":  # a pure elementwise pass each way
        assert len(fwd) == 1 and len(bwd) == 1, (fwd, bwd)
    if kind == "batch" and mode != "batch-eval":
        assert mod.num_batches_tracked.tolist() == 1


def test_v1_counts_and_syncs_so_the_probe_can_fail(probe):
    """The probe sees v1's 3-launch forward and its float(num_batches_tracked) with momentum=None."""
    x = torch.randn(2, 8, 8, 8, device=DEVICE)
    with na.counted_launches() as logged:  # the benchmarks' counter agrees with the probe
        fwd, bwd = _fwd_bwd_counts(probe, _module("batch", "v1"), x)
    assert len(fwd) == 3 and "_fwd_merge_kernel" in fwd and len(bwd) == 2
    assert logged == fwd + bwd
    with pytest.raises(HostSync, match="__float__"), probe.counting():
        _module("batch", "v1", momentum=None)(x)


def test_v2_forward_is_one_op_and_launchers_only_allocate(probe):
    """Around the op nothing runs (v1 runs ~9 small torch ops for the running statistics), and inside the launchers
    only allocations happen besides the Triton launches."""
    mod = _module("batch", "v2")
    x = torch.randn(2, 8, 8, 8, device=DEVICE, requires_grad=True)
    with _Ops() as seen:
        mod(x)
    assert seen.ops == ["fastp2p::norm_act_fwd2"], seen.ops
    with _Ops() as seen_v1:
        _module("batch", "v1")(x)
    assert len(seen_v1.ops) > 5  # the v1 host-side update: shows the mode sees torch ops
    allowed = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zero_",
               "aten::empty.memory_format", "aten::fill_"}
    xd = x.detach()
    rm, rv, nbt = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE), torch.zeros((), dtype=torch.long,
                                                                                             device=DEVICE)
    dy = torch.ones_like(xd)
    with _Ops() as inside:
        y, mean, var = na.norm_act_forward_v2(xd, None, None, None, None, rm, rv, nbt, "batch", "relu", 1e-5, 0.2, 0.1,
                                              False)
        na.norm_act_backward_v2(dy, xd, None, None, mean, var, "batch", "relu", 1e-5, 0.2)
    assert set(inside.ops) <= allowed, set(inside.ops) - allowed


def _tol(n: int, scale: float) -> dict:
    """A float32 sum of n terms is within n * 2^-24 of the terms' magnitude (the deterministic bound); mean, variance
    and the merge chain a few of those (4x). Three momentum steps only average such values."""
    g = 4 * n * 2.0 ** -24
    return dict(rtol=g, atol=g * scale)


@pytest.mark.parametrize("cfg", [{}, MULTI], ids=["one-chunk", "multi-chunk"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_running_stats_match_float64_batchnorm(variant, momentum, cfg):
    """Three training steps: running_mean, running_var (unbiased, momentum or cumulative average) and
    num_batches_tracked against nn.BatchNorm2d in float64 on the same inputs."""
    bn = nn.BatchNorm2d(8, momentum=momentum).to(DEVICE)
    nn.init.normal_(bn.weight, 1, 0.3)
    ref = copy.deepcopy(bn).double()
    fused = FusedNormAct(bn, "relu", backend="triton", variant=variant)
    shape = (2, 8, 8, 8)
    n = shape[0] * shape[2] * shape[3]
    scale = 0.0
    with na.override_config(**cfg), na.poisoned_outputs():
        for _ in range(3):
            x = torch.randn(shape, device=DEVICE) * 3 + 2
            scale = max(scale, x.abs().max().item(), x.var().item())
            y = fused(x)
            yr = torch.relu(ref(x.double()))
            torch.testing.assert_close(y.double(), yr, **_tol(n, 10.0))
    torch.testing.assert_close(bn.running_mean.double(), ref.running_mean, **_tol(n, scale))
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, **_tol(n, scale))
    assert bn.num_batches_tracked.tolist() == ref.num_batches_tracked.tolist() == 3
