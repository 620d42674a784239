"""Speed transforms for fastp2p, applied from outside the (pure) models.

Nothing here changes what a model computes beyond fp32 rounding, and nothing changes parameter names: the transforms
swap a module's class in place (same object, same ``weight``/``bias`` Parameters, same state_dict keys) or wrap a copy.

Training (CPU, fp32):
    ``apply_gemm_convs``   Conv2d / ConvTranspose2d layers whose matmul has few rows (small spatial size: the U-Net's
                           inner levels) compute as one matmul + im2col/col2im (``GemmConv2d``/``GemmConvTranspose2d``)
                           instead of oneDNN, which re-lays-out the weight on every call and is weight-bound there.
    ``apply_channels_last`` measured slower on this CPU for eager training (see its docstring); used on CUDA only.
    ``tune_malloc``        opt-in, process-wide glibc setting that stops page-faulting fresh 32 MB buffers.
    ``apply_training_transforms`` the fixed recipe ``fastp2p.train`` uses.
Inference:
    ``optimize_for_inference`` the generator in eval mode (or paper mode without dropout): torch.compile with inductor
                           weight freezing (oneDNN prepacked weights, BN folded, activations fused), or, without any
                           compile, oneDNN-prepacked conv weights (``method="packed"``).

Measurements: 2-core AMD EPYC (avx512), torch 2.13 CPU, fp32, batch 1, 256x256, unet_256/ngf 64 and the basic PatchGAN;
medians of candidates interleaved in one process. The machine is shared and noisy (single runs vary up to 2x), so
every number below comes from interleaved repeats and should be read as +-10%.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("fastp2p.perf")

# ---------------------------------------------------------------------------------------------------------------------
# Rules, with the measurements that set them
# ---------------------------------------------------------------------------------------------------------------------
# A conv layer goes through the GEMM path when its matmul has at most GEMM_MAX_ROWS rows: N*H*W input positions for a
# ConvTranspose2d, N*Ho*Wo output positions for a Conv2d. Per layer fwd+bwd, batch 1, native oneDNN vs GEMM, ms (one
# quiet interleaved run, glibc's default malloc):
#   ConvT 512->512  in 1x1   (rows 1):    18.2 vs  3.4     Conv 512->512 in 2x2   (rows 1):    7.6 vs  3.3
#   ConvT 1024->512 in 2x2   (rows 4):    57.4 vs 21.6     Conv 512->512 in 4x4   (rows 4):   14.1 vs  6.1
#   ConvT 1024->512 in 4x4   (rows 16):   58.4 vs 21.9     Conv 512->512 in 8x8   (rows 16):   9.9 vs  6.5
#   ConvT 1024->512 in 8x8   (rows 64):   69.8 vs 34.6     Conv 512->512 in 16x16 (rows 64):  16.0 vs 14.4
#   ConvT 1024->256 in 16x16 (rows 256):  48.4 vs 38.6     Conv 256->512 in 32x32 (rows 256): 18.3 vs 20.8
#   ConvT 512->128  in 32x32 (rows 1024): 33.3 vs 39.4     Conv 128->256 in 64x64 (rows 1024): 17.2 vs 23.0
# With ``tune_malloc`` the native side loses its page faults and the margins shrink (ConvT 2x2 18.4 vs 13.3, 4x4 20.8
# vs 11.9, 8x8 31.0 vs 26.1, 16x16 38.7 vs 42.9). Batch 8 agrees on rows, not on spatial size: ConvT 1024->512 at 2x2
# (rows 32) 38.8 vs 19.4 ms, at 4x4 (rows 128) 55 vs 46 ms, at 8x8 (rows 512) 356 vs 358 ms. Whole training step,
# batch 1 (G+D, fused Adam), two interleaved runs: max rows 16 -> 633/646 ms, 64 -> 614/604 ms, 256 -> 613/623 ms.
# 64 is kept: never worse per layer, and in the step as good as 256.
GEMM_MAX_ROWS = 64
# Products with fewer rows than this are computed with the activations on the left, (rows, Cin) @ (Cin, K); with
# more, the weight goes on the left, (K, Cin) @ (Cin, rows). MKL's sgemm is slow for a thin right-hand operand: for
# a 1024x8192 weight and 4 rows, (4,1024)@(1024,8192) takes 4.7 ms but (8192,1024)@(1024,4) 24 ms; from 16 rows up the
# weight-left form is ~10% faster (64 rows: 9.2 vs 10.6 ms).
GEMM_ROWS_FIRST_BELOW = 16
# Layers with at most this many output columns K = out_channels*kh*kw (the PatchGAN's last conv 512->1: 16; the
# U-Net's last ConvTranspose2d 128->3: 48) take a GEMM path at any size: oneDNN is slow with 1-3 output channels.
# PatchGAN 512->1, 4x4, stride 1 on 31x31, fwd+bwd: native 3.9 ms vs 1.8 ms (fwd alone 1.3 vs 0.45 ms; it runs three
# times a step). U-Net ConvTranspose2d 128->3 on 128x128, fwd+bwd: native 10.6 vs GEMM 9.3 ms (fwd 6.9 vs 3.7 ms).
GEMM_SMALL_OUT_COLS = 64


# ---------------------------------------------------------------------------------------------------------------------
# GEMM formulations of Conv2d / ConvTranspose2d
# ---------------------------------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _mat(t: torch.Tensor, rows: bool) -> torch.Tensor:
    """(N, C, L) -> (N*L, C) if ``rows`` else (C, N*L); contiguous (the batch is folded into the matmul, so the weight
    is read once per call, not once per sample)."""
    N, C, L = t.shape
    if rows:
        return t.transpose(1, 2).reshape(N * L, C)
    return t.reshape(C, L) if N == 1 else t.transpose(0, 1).reshape(C, N * L)


def _unmat(m: torch.Tensor, N: int, rows: bool) -> torch.Tensor:
    """Inverse of ``_mat``: (N*L, C) or (C, N*L) -> (N, C, L), a view."""
    if rows:
        return m.view(N, -1, m.shape[1]).transpose(1, 2)
    return m.view(m.shape[0], N, -1).transpose(0, 1)


class _ConvTransposeGemm(torch.autograd.Function):
    """y = col2im(W^T x) (+ b): ConvTranspose2d as one matmul over all N*H*W input positions, then ``F.fold``.

    Backward: dcols = im2col(dy); dx = W dcols; dW = x dcols^T; db = sum(dy). Nothing but x (as a matrix) is saved."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, out_hw):
        N, Cin, H, W = x.shape
        Cout, kh, kw = w.shape[1:]
        wr = w.reshape(Cin, Cout * kh * kw)
        rows = N * H * W < GEMM_ROWS_FIRST_BELOW
        xm = _mat(x.reshape(N, Cin, H * W), rows)
        cols = xm @ wr if rows else wr.t() @ xm  # (n, K) or (K, n), K = Cout*kh*kw
        y = F.fold(_unmat(cols, N, rows), out_hw, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        if b is not None:
            y += b.view(1, -1, 1, 1)
        ctx.save_for_backward(xm, w)
        ctx.conf = (N, H, W, stride, padding, dilation, rows, b is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        xm, w = ctx.saved_tensors
        N, H, W, stride, padding, dilation, rows, has_bias = ctx.conf
        Cin, Cout, kh, kw = w.shape
        wr = w.reshape(Cin, Cout * kh * kw)
        g = _mat(F.unfold(gy, (kh, kw), dilation=dilation, padding=padding, stride=stride), rows)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _unmat(g @ wr.t() if rows else wr @ g, N, rows).reshape(N, Cin, H, W).contiguous()
        if ctx.needs_input_grad[1]:
            gw = (xm.t() @ g if rows else xm @ g.t()).view(w.shape)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


class _ConvGemm(torch.autograd.Function):
    """y = W im2col(x) (+ b): Conv2d as ``F.unfold`` plus one matmul over all N*Ho*Wo output positions.

    Backward: dW = dy cols^T; dx = col2im(W^T dy); db = sum(dy). Saves the unfolded input (small: only used for layers
    with few output positions)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation):
        N, Cin, H, W = x.shape
        Cout, _, kh, kw = w.shape
        Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        wr = w.reshape(Cout, Cin * kh * kw)
        rows = N * Ho * Wo < GEMM_ROWS_FIRST_BELOW
        cm = _mat(F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride), rows)
        y = _unmat(cm @ wr.t() if rows else wr @ cm, N, rows).reshape(N, Cout, Ho, Wo).contiguous()
        if b is not None:
            y += b.view(1, -1, 1, 1)
        ctx.save_for_backward(cm, w)
        ctx.conf = (N, H, W, Ho, Wo, stride, padding, dilation, rows, b is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        cm, w = ctx.saved_tensors
        N, H, W, Ho, Wo, stride, padding, dilation, rows, has_bias = ctx.conf
        Cout, Cin, kh, kw = w.shape
        wr = w.reshape(Cout, Cin * kh * kw)
        g = _mat(gy.reshape(N, Cout, Ho * Wo), rows)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gc = _unmat(g @ wr if rows else wr.t() @ g, N, rows)
            gx = F.fold(gc, (H, W), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        if ctx.needs_input_grad[1]:
            gw = (g.t() @ cm if rows else g @ cm.t()).view(w.shape)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None


class _ConvSmallOutGemm(torch.autograd.Function):
    """Conv2d with few output columns K = Cout*kh*kw (dilation 1): Z = W' xpad, a (K, Cin) @ (Cin, Hp*Wp) matmul over
    the padded input, then y = the sum over the kh*kw taps of strided, shifted slices of Z. Never materializes the
    (Cin*kh*kw, Ho*Wo) im2col matrix, which for a 512->1 conv is 1000x larger than the output."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        N, Cin, H, W = x.shape
        Cout, _, kh, kw = w.shape
        (sh, sw), (ph, pw) = stride, padding
        Hp, Wp = H + 2 * ph, W + 2 * pw
        Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
        xp = F.pad(x, (pw, pw, ph, ph)).reshape(N, Cin, Hp * Wp)
        wk = w.permute(0, 2, 3, 1).reshape(Cout * kh * kw, Cin)
        Z = torch.matmul(wk, xp).view(N, Cout, kh, kw, Hp, Wp)
        y = None
        for ky in range(kh):
            for kx in range(kw):
                s = Z[:, :, ky, kx, ky:ky + sh * (Ho - 1) + 1:sh, kx:kx + sw * (Wo - 1) + 1:sw]
                y = s.clone(memory_format=torch.contiguous_format) if y is None else y.add_(s)
        if b is not None:
            y += b.view(1, -1, 1, 1)
        ctx.save_for_backward(xp, wk)
        ctx.conf = (H, W, Cout, kh, kw, sh, sw, ph, pw, Hp, Wp, Ho, Wo, b is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        xp, wk = ctx.saved_tensors
        H, W, Cout, kh, kw, sh, sw, ph, pw, Hp, Wp, Ho, Wo, has_bias = ctx.conf
        N, Cin = xp.shape[:2]
        gZ = gy.new_zeros(N, Cout, kh, kw, Hp, Wp)
        for ky in range(kh):
            for kx in range(kw):
                gZ[:, :, ky, kx, ky:ky + sh * (Ho - 1) + 1:sh, kx:kx + sw * (Wo - 1) + 1:sw] = gy
        gZ = gZ.view(N, Cout * kh * kw, Hp * Wp)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(wk.t(), gZ).view(N, Cin, Hp, Wp)[:, :, ph:ph + H, pw:pw + W].contiguous()
        if ctx.needs_input_grad[1]:
            gwk = gZ[0] @ xp[0].t() if N == 1 else torch.matmul(gZ, xp.transpose(1, 2)).sum(0)
            gw = gwk.view(Cout, kh, kw, Cin).permute(0, 3, 1, 2).contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None


def gemm_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``F.conv2d`` (groups=1, zero padding, int/tuple padding) as unfold + matmul; same values (up to fp32 rounding)
    and the same gradients for x, weight and bias."""
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    y = _ConvGemm.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation))
    return y.squeeze(0) if unbatched else y


def gemm_conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1) -> torch.Tensor:
    """``F.conv_transpose2d`` (groups=1) as matmul + fold; same values and gradients."""
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    s, p, op, d = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
    kh, kw = weight.shape[2:]
    H, W = x.shape[2:]
    out = ((H - 1) * s[0] - 2 * p[0] + d[0] * (kh - 1) + op[0] + 1,
           (W - 1) * s[1] - 2 * p[1] + d[1] * (kw - 1) + op[1] + 1)
    y = _ConvTransposeGemm.apply(x, weight, bias, s, p, d, out)
    return y.squeeze(0) if unbatched else y


def _conv_out_hw(m: nn.Conv2d, H: int, W: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _gemm_supported(m: nn.Module) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def gemm_rows(m: nn.Module, input_shape) -> int:
    """Rows of the layer's GEMM for an input of ``input_shape`` (N, C, H, W): N*H*W for a ConvTranspose2d, N*Ho*Wo
    for a Conv2d."""
    N, _, H, W = input_shape
    if isinstance(m, nn.ConvTranspose2d):
        return N * H * W
    Ho, Wo = _conv_out_hw(m, H, W)
    return N * Ho * Wo


def _out_cols(m: nn.Module) -> int:
    return m.out_channels * m.kernel_size[0] * m.kernel_size[1]


def gemm_path(m: nn.Module, input_shape, max_rows: int | None = None, small_out_cols: int | None = None) -> str | None:
    """Which path a (Gemm)Conv layer takes for ``input_shape``: "gemm" (few rows), "small_out" (Conv2d with few output
    columns, see ``GEMM_SMALL_OUT_COLS``) or None (native). A ConvTranspose2d with few output columns uses "gemm".
    The limits default to the layer's own (``from_native``), else to the module constants."""
    if not _gemm_supported(m):
        return None
    max_rows = getattr(m, "gemm_max_rows", GEMM_MAX_ROWS) if max_rows is None else max_rows
    small_cols = getattr(m, "gemm_small_out_cols", GEMM_SMALL_OUT_COLS) if small_out_cols is None else small_out_cols
    if gemm_rows(m, input_shape) <= max_rows:
        return "gemm"
    if _out_cols(m) <= small_cols:
        if isinstance(m, nn.ConvTranspose2d):
            return "gemm"
        if tuple(m.dilation) == (1, 1):
            return "small_out"
    return None


def _gemm_path_now(m: nn.Module, x: torch.Tensor) -> str | None:
    # CPU only, not under autocast (bf16: the native kernels are used), weights and input of one dtype.
    if (x.device.type != "cpu" or x.dim() != 4 or not x.is_floating_point() or x.dtype != m.weight.dtype
            or torch.is_autocast_enabled("cpu")):
        return None
    return gemm_path(m, x.shape)


class GemmConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes through ``gemm_conv2d`` when its GEMM has at most ``gemm_max_rows`` rows
    (N*Ho*Wo), through ``_ConvSmallOutGemm`` when it has at most ``gemm_small_out_cols`` output columns, and through
    the native kernel otherwise (``gemm_path``); decided per call, so any crop or batch size is fine. Same parameters
    and state_dict keys as the ``nn.Conv2d`` it was made from (``from_native`` swaps the class in place)."""

    gemm_max_rows: int = GEMM_MAX_ROWS
    gemm_small_out_cols: int = GEMM_SMALL_OUT_COLS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = _gemm_path_now(self, x)
        if path == "gemm":
            return _ConvGemm.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if path == "small_out":
            return _ConvSmallOutGemm.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    @classmethod
    def from_native(cls, m: nn.Conv2d, max_rows: int = GEMM_MAX_ROWS,
                    small_out_cols: int = GEMM_SMALL_OUT_COLS) -> GemmConv2d:
        """Turn ``m`` itself into a GemmConv2d (same object, same Parameters) and return it."""
        return _swap_to_gemm(cls, nn.Conv2d, m, max_rows, small_out_cols)


class GemmConvTranspose2d(nn.ConvTranspose2d):
    """An ``nn.ConvTranspose2d`` that computes through ``gemm_conv_transpose2d`` when its GEMM has at most
    ``gemm_max_rows`` rows (N*H*W of the input) or at most ``gemm_small_out_cols`` columns (Cout*kh*kw), natively
    otherwise. See ``GemmConv2d``."""

    gemm_max_rows: int = GEMM_MAX_ROWS
    gemm_small_out_cols: int = GEMM_SMALL_OUT_COLS

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if _gemm_path_now(self, x) is not None:
            op = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
            return gemm_conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, op, self.dilation)
        return super().forward(x, output_size)

    @classmethod
    def from_native(cls, m: nn.ConvTranspose2d, max_rows: int = GEMM_MAX_ROWS,
                    small_out_cols: int = GEMM_SMALL_OUT_COLS) -> GemmConvTranspose2d:
        return _swap_to_gemm(cls, nn.ConvTranspose2d, m, max_rows, small_out_cols)


def _swap_to_gemm(cls, native: type, m: nn.Module, max_rows: int, small_out_cols: int):
    """Swap ``m``'s class to the GEMM subclass ``cls`` in place (same object, Parameters and state_dict keys)."""
    if type(m) not in (native, cls) or not _gemm_supported(m):
        raise TypeError(f"needs a plain nn.{native.__name__} with groups=1 and zero padding given as numbers; "
                        f"got {m!r}")
    m.__class__ = cls
    m.gemm_max_rows, m.gemm_small_out_cols = max_rows, small_out_cols
    return m


def conv_input_shapes(model: nn.Module, example_shape) -> dict[str, tuple[int, ...]]:
    """Input shape of every Conv2d/ConvTranspose2d in ``model`` for an input of ``example_shape``, from one probe
    forward (eval mode, no grad; the modules' train/eval flags are restored, so batch-norm statistics are untouched)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: shapes.__setitem__(name, tuple(inp[0].shape)))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    flags = {m: m.training for m in model.modules()}
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(example_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for m, t in flags.items():
            m.training = t
    return shapes


def gemm_plan(model: nn.Module, example_shape, max_rows: int = GEMM_MAX_ROWS,
              small_out_cols: int = GEMM_SMALL_OUT_COLS) -> list[dict]:
    """For inputs of ``example_shape``: each conv layer's input shape, GEMM rows and path ("gemm", "small_out" or
    None = native) under ``apply_gemm_convs``'s rule."""
    shapes = conv_input_shapes(model, example_shape)
    return [{"name": name, "kind": type(m).__name__, "input_shape": shapes[name], "rows": gemm_rows(m, shapes[name]),
             "path": gemm_path(m, shapes[name], max_rows, small_out_cols)}
            for name, m in model.named_modules() if name in shapes]


def apply_gemm_convs(model: nn.Module, max_rows: int = GEMM_MAX_ROWS, example_shape=None,
                     small_out_cols: int = GEMM_SMALL_OUT_COLS) -> nn.Module:
    """Swap ``model``'s Conv2d/ConvTranspose2d layers to their GEMM versions, in place; returns ``model``.

    Each swapped layer decides per call (``gemm_path``): GEMM while its matmul has <= ``max_rows`` rows (see
    ``GEMM_MAX_ROWS``) or, whatever its size, when it has <= ``small_out_cols`` output columns
    (``GEMM_SMALL_OUT_COLS``); native otherwise. With ``example_shape`` (N, C, H, W) only the layers that take a GEMM
    path at that input size are swapped (one probe forward); without it every supported layer is swapped and the
    per-call rule alone decides.
    Parameters, state_dict keys, hooks and ``isinstance(m, nn.Conv2d)`` are unchanged."""
    selected = None
    if example_shape is not None:
        plan = gemm_plan(model, example_shape, max_rows, small_out_cols)
        selected = {p["name"] for p in plan if p["path"] is not None}
    for name, m in model.named_modules():
        if selected is not None and name not in selected:
            continue
        if type(m) in (nn.Conv2d, GemmConv2d) and _gemm_supported(m):
            GemmConv2d.from_native(m, max_rows, small_out_cols)
        elif type(m) in (nn.ConvTranspose2d, GemmConvTranspose2d) and _gemm_supported(m):
            GemmConvTranspose2d.from_native(m, max_rows, small_out_cols)
    return model


def remove_gemm_convs(model: nn.Module) -> nn.Module:
    """Undo ``apply_gemm_convs`` in place."""
    for m in model.modules():
        if type(m) is GemmConv2d:
            m.__class__ = nn.Conv2d
        elif type(m) is GemmConvTranspose2d:
            m.__class__ = nn.ConvTranspose2d
        else:
            continue
        m.__dict__.pop("gemm_max_rows", None)
        m.__dict__.pop("gemm_small_out_cols", None)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Memory format, allocator, CPU features
# ---------------------------------------------------------------------------------------------------------------------
def apply_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` (in place; feed it channels-last inputs too).

    Used on CUDA only. On this CPU it is slower for eager fp32 training: whole step (G+D, fused Adam, batch 1) 648/661
    ms NCHW vs 754/828 ms channels-last (two interleaved runs), and the GEMM layers want NCHW. Eager inference gains a
    little (batch 1: 128 vs 118 ms, batch 8: 804 vs 673 ms), but the prepacked/compiled paths, which are much faster,
    gain nothing from it (prepacked, batch 8: 612 vs 610 ms; inductor picks its own layout)."""
    return model.to(memory_format=torch.channels_last)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_malloc() -> bool:
    """Opt-in, process-wide: make glibc malloc keep freed memory instead of returning it to the kernel.

    PyTorch allocates CPU tensors with glibc malloc, which serves blocks of >= 32 MB (and smaller ones, adaptively)
    with fresh mmaps and returns them on free, so every such tensor page-faults all its pages again (a 32 MB clone:
    9.3 ms instead of 2.3 ms). oneDNN re-lays-out every conv weight into a fresh buffer on every call, so the native
    small-spatial convs suffer most: ConvTranspose2d 1024->512 at 2x2, fwd+bwd, 55 -> 18 ms. Whole step (fused Adam,
    native convs) ~665 -> ~615 ms, baseline eager ~850 -> ~690 ms; with the GEMM convs (which avoid those buffers)
    it changes nothing measurable (~590 ms either way). Cost: the process keeps its peak heap (no trimming).

    Because it is process-wide it also speeds up any baseline measured in the same process. Sets M_MMAP_MAX=0 and
    M_TRIM_THRESHOLD=2 GiB via ``mallopt``; returns False (and does nothing) where glibc is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (avx512_bf16 or AMX), i.e. bf16 autocast is worth it."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------------------------------
def available_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, cgroup cpusets, Slurm), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# OpenMP waiting, set in the environment before torch loads (the runtime reads it once): a thread that finishes its
# part of a parallel region spins 1,000 rounds, then sleeps. Debug-preset step, ms (2-core EPYC, interleaved):
#   idle machine:          default spin (300,000) 31-50, GOMP_SPINCOUNT=1000 42-58, OMP_WAIT_POLICY=PASSIVE 76-126
#   one busy neighbour:    default 219-224,             1000 90-92,               PASSIVE 60-65
# PASSIVE wins under load but costs ~2.4x on an idle VM (waking a halted vCPU per region); 1000 keeps an idle machine
# within ~1.2x and a shared one within ~2.5x. KMP_BLOCKTIME is the same knob (ms) for Intel's OpenMP (conda builds).
WAIT_ENV = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}


def local_processes() -> int:
    """Training processes sharing this machine's cores: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def thread_plan(num_workers: int, cores: int, nproc: int = 1) -> tuple[int, int]:
    """``(intra-op threads, DataLoader workers)`` for one of ``nproc`` training processes on ``cores`` cores: each
    process gets an equal share of the cores (at least one) as threads, and at most that many worker processes.

    Waiting, not the thread count, is what made a busy neighbour so costly: libgomp's threads spin (300,000 rounds)
    at the end of every parallel region, and on 2 cores beside one busy process the spinning thread starves the one
    it waits for (debug preset: 26 -> 1.9 img/s). ``WAIT_ENV`` (set by the CLI before torch loads) cuts the spin to
    1,000 rounds; see bench/README.md ("CPU threads") for the measurements."""
    share = max(1, cores // max(1, nproc))
    return share, max(0, min(num_workers, share))


# ---------------------------------------------------------------------------------------------------------------------
# Training recipe
# ---------------------------------------------------------------------------------------------------------------------
def apply_training_transforms(G: nn.Module, D: nn.Module, cfg, device) -> tuple[nn.Module, nn.Module]:
    """The training-time transforms, in place, in one fixed order; returns the modules to call, ``(G_run, D_run)``.

    channels-last: ``cfg.train.channels_last`` (None = on for CUDA, off on CPU, see ``apply_channels_last``).
    fused norm + activation: ``cfg.train.kernels`` (``--kernels triton|torch``; default triton with CUDA).
    GEMM convs: CPU, NCHW, not ``--compile`` (inductor picks its own conv kernels). Under bf16 autocast the GEMM
    layers fall back to the native kernels per call. Whole fp32 step, batch 1, 256x256, G+D, interleaved in one
    process (quiet run): eager with for-loop Adam 759 ms, fused Adam 630 ms, fused Adam + GEMM convs 566 ms (1.34x).
    ``python -m fastp2p.bench.core --only train`` (data loading in the loop), three quiet runs: baseline 733 / 788 /
    805 ms, fastp2p-fp32 581 / 597 / 615 ms (1.26x / 1.32x / 1.31x). The fp32 step then runs at ~80% of the measured
    sgemm peak; the rest is mostly the weight-bound inner layers (MKL's sgemm streams a weight at ~7 GB/s for 4 rows
    vs ~23 GB/s for 1) and batch norm / activations."""
    device = torch.device(device)
    t = cfg.train
    cl = t.channels_last if t.channels_last is not None else device.type == "cuda"
    if cl:
        apply_channels_last(G)
        apply_channels_last(D)
    # Fused Triton norm + activation (fastp2p.kernels); "torch" keeps PyTorch's own modules, which is what the fused
    # modules' torch backend would run anyway.
    from .kernels import apply_fused_kernels, default_backend

    backend = t.kernels or default_backend()
    if backend == "triton":
        apply_fused_kernels(G, "triton")
        apply_fused_kernels(D, "triton")
    # The U-Net up path's ReLU(cat) as one write into a preallocated buffer ("norm": the up norms' Triton kernels write
    # their slice of it themselves): opt-in until a GPU run confirms it.
    skips = fused_skips_mode()
    if skips:
        apply_fused_skips(G, norm_writes=skips == "norm")
    if device.type == "cpu" and not cl and not getattr(t, "compile", False):
        apply_gemm_convs(G)
        apply_gemm_convs(D)
    return G, D


# ---------------------------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------------------------
class PackedConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` whose weight is stored in oneDNN's blocked layout once (eager oneDNN re-lays it out on
    every call). Inference only (no autograd), CPU fp32."""

    def __init__(self, m: nn.Conv2d, input_shape):
        super().__init__()
        self.padding, self.stride, self.dilation = list(m.padding), list(m.stride), list(m.dilation)
        self.groups = m.groups
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            m.weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(input_shape))
        self.bias = None if m.bias is None else m.bias.detach().clone()

    def forward(self, x):
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


class PackedConvTranspose2d(nn.Module):
    """``PackedConv2d`` for ``nn.ConvTranspose2d``."""

    def __init__(self, m: nn.ConvTranspose2d, input_shape):
        super().__init__()
        self.padding, self.stride, self.dilation = list(m.padding), list(m.stride), list(m.dilation)
        self.output_padding, self.groups = list(m.output_padding), m.groups
        self.packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
            m.weight.detach(), self.padding, self.output_padding, self.stride, self.dilation, self.groups,
            list(input_shape))
        self.bias = None if m.bias is None else m.bias.detach().clone()

    def forward(self, x):
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, self.packed, self.bias, self.padding, self.output_padding, self.stride, self.dilation, self.groups,
            "none", [], "")


def pack_conv_weights(model: nn.Module, example_shape) -> nn.Module:
    """Replace, in place, every zero-padded Conv2d/ConvTranspose2d of a CPU fp32 ``model`` by its ``Packed*`` version,
    laid out for inputs of ``example_shape``. Layers with few output columns (``GEMM_SMALL_OUT_COLS``: the U-Net's last
    ConvTranspose2d, 128->3) become GEMM layers instead: in the model, batch 1, 3.5 ms vs 5.3 ms prepacked oneDNN vs
    6.3 ms eager (batch 8: 40 vs 41 ms). Breaks the state_dict: use on an inference copy only."""
    shapes = conv_input_shapes(model, example_shape)
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            full = f"{pname}.{cname}" if pname else cname
            if full not in shapes or child.padding_mode != "zeros" or isinstance(child.padding, str):
                continue
            if _out_cols(child) <= GEMM_SMALL_OUT_COLS and gemm_path(child, shapes[full], 0) is not None:
                kind = GemmConvTranspose2d if isinstance(child, nn.ConvTranspose2d) else GemmConv2d
                kind.from_native(child, max_rows=0)  # only the few-output-columns path
            elif type(child) in (nn.ConvTranspose2d, GemmConvTranspose2d):
                setattr(parent, cname, PackedConvTranspose2d(child, shapes[full]))
            elif type(child) in (nn.Conv2d, GemmConv2d):
                setattr(parent, cname, PackedConv2d(child, shapes[full]))
    return model


INFERENCE_METHODS = ("inductor", "packed", "gemm", "eager")


class OptimizedGenerator(nn.Module):
    """What ``optimize_for_inference`` returns: call it like the generator (it runs under ``torch.inference_mode``).

    Attributes: ``method``, ``setup_s`` (total), ``compile_s`` (the inductor compile, 0 otherwise), ``max_abs_err``
    (vs the eager generator on a random input of the example shape; None when not checked), ``tried`` (method ->
    why it was not taken)."""

    def __init__(self, net, method: str, module: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.autocast = autocast
        self.module = module  # the (copied, transformed) generator; `net` may be its compiled wrapper
        object.__setattr__(self, "_net", net)  # not registered: its parameters are `module`'s
        self._context = contextlib.nullcontext
        if method == "inductor":  # a new input shape recompiles; keep freezing on for that compile too
            import torch._inductor.config as inductor_config

            self._context = lambda: inductor_config.patch(freezing=True)
        self.method = method
        self.setup_s = self.compile_s = 0.0
        self.max_abs_err: float | None = None
        self.tried: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._context():
            if self.autocast is None:
                return self._net(x)
            with torch.autocast(x.device.type, dtype=self.autocast):
                return self._net(x).float()


def _check_inference_ready(G: nn.Module) -> bool:
    """Raise on train-mode batch norm; return True when a dropout layer is active (output random)."""
    for name, m in G.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"optimize_for_inference: {name or 'model'} is a batch norm in training mode; set the "
                             "generator up with fastp2p.inference.with_mode(G, 'eval' | 'paper') or pass mode=")
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in G.modules())


def _build(method: str, G: nn.Module, example_shape, autocast: torch.dtype | None = None):
    """(callable, module, compile seconds) for ``method`` on a private copy of G."""
    g = copy.deepcopy(G).requires_grad_(False)
    x = torch.rand(example_shape) * 2 - 1
    if method == "eager":
        return g, g, 0.0
    if method == "gemm":
        apply_gemm_convs(g)
        return g, g, 0.0
    if method == "packed":
        pack_conv_weights(g, example_shape)
        return g, g, 0.0
    if method == "inductor":
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        from torch._dynamo.utils import counters

        t0 = time.perf_counter()
        compiled = torch.compile(g, dynamic=False)
        # freezing: parameters become constants, so inductor prepacks conv weights for oneDNN, folds eval-mode batch
        # norm into the down convs and fuses LeakyReLU/ReLU/tanh into them (the flag matters at compile time only).
        amp = torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        # Every compiled copy adds ~2 guard entries to the one code object UnetGenerator.forward; past dynamo's
        # recompile_limit (8) the 5th build in a process silently ran eager (found by `fastp2p bench infer`, which
        # builds ~16). The limit only matters while this first call compiles; a build that still compiled no graph
        # is refused, so method="auto" falls back to "packed" instead of calling eager "inductor".
        limit = dynamo_config.patch(recompile_limit=max(256, dynamo_config.recompile_limit))
        before = counters["stats"]["unique_graphs"]
        with limit, inductor_config.patch(freezing=True), torch.inference_mode(), amp:
            compiled(x)
        if counters["stats"]["unique_graphs"] == before:
            raise RuntimeError("torch.compile compiled no graph (dynamo's recompile limit?); it would run eager")
        return compiled, g, time.perf_counter() - t0
    raise ValueError(f"unknown method {method!r}; choose one of auto, {', '.join(INFERENCE_METHODS)}")


def optimize_for_inference(G: nn.Module, example_shape, method: str = "auto", mode: str | None = None,
                           check: bool = True, atol: float | None = None, precision: str = "fp32"
                           ) -> OptimizedGenerator:
    """A fast CPU fp32 inference version of generator ``G`` for inputs of ``example_shape`` (N, C, H, W).

    ``G`` is used with its current semantics (``with_mode(G, 'eval')``, or ``with_mode(G, 'paper', dropout=False)``);
    or pass ``mode='eval' | 'paper'`` to have that applied to a copy (paper mode then without dropout). ``G`` itself is
    never modified: every method works on a deep copy, so later changes to G's weights are not seen (rebuild).

    method: ``inductor`` torch.compile + inductor freezing (compile ~6-20 s on 2 cores, per input shape; other
    shapes recompile); ``packed`` oneDNN-prepacked conv weights, no compile (~0.5 s); ``gemm`` GEMM convs (little gain
    in inference); ``eager``; ``auto`` = the first of inductor, packed, eager that builds and, with ``check``, matches
    eager G within ``atol`` (max abs error on a random input in [-1, 1]). Not CPU fp32: ``auto`` gives eager.

    unet_256, 256x256, medians interleaved in one process, quiet machine (ms; eager = this repo's flat U-Net, ref =
    the reference's nested U-Net, both eager fp32 under inference_mode):
      eval, batch 1:  eager 102.8, ref 103.1, gemm 98.2, packed 68.0, inductor 66.9 (1.54x)
      eval, batch 8:  eager 705, ref 640, gemm 696, packed 572, inductor 534 (1.32x vs eager, 1.20x vs ref)
      paper (no dropout), batch 1: eager 110.6, gemm 103.0, packed 82.2, inductor 68.9 (1.61x)
    torch.jit trace + freeze + optimize_for_inference: 102 vs eager 106 (no gain measured); torch.utils.mkldnn
    has no ConvTranspose2d, so it cannot convert the U-Net. Inductor compile: 6-7 s with a warm cache (~20 s cold).
    Max abs error vs eager: inductor 4-6e-6 (batch norm folded), packed < 1e-7 (eval), gemm < 1e-7.
    Floor: the generator is 12.1 GFLOP per 256x256 image and the convs already run at ~190-200 GFLOP/s (the measured
    sgemm peak) once weights are prepacked, so ~60 ms/image is the fp32 limit here.

    ``precision="bf16"`` (opt-in, CPUs with native bf16 only): inductor under bf16 autocast, fp32 output; default
    ``atol`` 2.5e-2 (a uint8 level is 7.8e-3). Measured batch 1, eval: eager fp32 94 ms, packed fp32 64 ms, inductor
    bf16 33 ms (2.9x), max abs err 4e-4 on a freshly initialized G."""
    from .inference import with_mode

    t0 = time.perf_counter()
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    autocast = torch.bfloat16 if precision == "bf16" else None
    if atol is None:
        # bf16: 8 mantissa bits; through the 16 layers of a trained unet_256 (facades, 1600 steps) the outputs drifted
        # up to 1.43e-2 from fp32 at batch 8 (under 2 uint8 levels), so 1e-2 refused a good build; 2.5e-2 is ~3 levels.
        atol = 2.5e-2 if autocast else 1e-4
    if autocast is not None:
        if method not in ("auto", "inductor"):
            raise ValueError(f"precision='bf16' runs through method='inductor', not {method!r}")
        if not cpu_has_native_bf16():
            raise ValueError("precision='bf16' needs a CPU with native bf16 (avx512_bf16 or AMX)")
        method = "inductor"
    if mode is not None:
        G = with_mode(G, mode, dropout=False, inplace=False)
    random_out = _check_inference_ready(G)
    p = next(G.parameters())
    cpu32 = p.device.type == "cpu" and p.dtype == torch.float32
    if method == "auto":
        candidates = ["inductor", "packed", "eager"] if cpu32 else ["eager"]
    elif method in INFERENCE_METHODS:
        if method in ("packed", "gemm") and not cpu32:
            raise ValueError(f"method={method!r} needs a CPU float32 generator")
        candidates = [method]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of auto, {', '.join(INFERENCE_METHODS)}")
    tried: dict[str, str] = {}
    for i, name in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            net, module, compile_s = _build(name, G, example_shape, autocast)
            out = OptimizedGenerator(net, name, module, autocast)
            out.compile_s = compile_s
            if check and not random_out:
                x = torch.rand(example_shape, dtype=p.dtype, device=p.device) * 2 - 1
                with torch.inference_mode():
                    err = (out(x) - G(x)).abs().max().item()
                out.max_abs_err = err
                if not err <= atol and not last:
                    tried[name] = f"max abs err {err:.2e} > {atol:g}"
                    continue
                if not err <= atol:
                    raise RuntimeError(f"optimize_for_inference: {name}: max abs err {err:.2e} > {atol:g}")
        except Exception as e:  # a method that fails to build falls through to the next one
            if last or method != "auto":
                raise
            tried[name] = f"{type(e).__name__}: {e}"
            log.warning("optimize_for_inference: %s unavailable (%s); trying the next method", name, tried[name])
            continue
        out.tried = tried
        out.setup_s = time.perf_counter() - t0
        return out
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------------
# U-Net skip path
# ---------------------------------------------------------------------------------------------------------------------
FUSED_SKIPS_ENV = "FASTP2P_FUSED_SKIPS"


def fused_skips_mode() -> str | None:
    """``$FASTP2P_FUSED_SKIPS``: unset/empty/0 -> None (the plain cat + ReLU), ``1`` -> ``"relu_cat"``, ``norm`` ->
    ``"norm"`` (relu_cat, and the up norms' Triton kernels write their slice of the buffer)."""
    v = os.environ.get(FUSED_SKIPS_ENV, "").strip().lower()
    if v in ("", "0"):
        return None
    if v in ("1", "relu_cat"):
        return "relu_cat"
    if v == "norm":
        return "norm"
    from .errors import UserError

    raise UserError(f"{FUSED_SKIPS_ENV}={v!r}: use 1 (relu_cat), norm (norm kernels write the slices) or leave it "
                    "unset")


def apply_fused_skips(G: nn.Module, norm_writes: bool = False) -> nn.Module:
    """The U-Net up path's ``ReLU(cat[a_i, u_{i+1}])`` written once into a preallocated buffer (``fastp2p.kernels.
    unet_skip``): same math, same state_dict keys, 2 passes over each level's activations instead of 4; with
    ``norm_writes`` the up norms' Triton kernels write ``ReLU(u_{i+1})`` into the buffer themselves. In place; returns
    ``G``. ``apply_training_transforms`` calls it per ``FASTP2P_FUSED_SKIPS`` (off by default)."""
    from .kernels import apply_fused_skips as _apply

    return _apply(G, norm_writes=norm_writes)
