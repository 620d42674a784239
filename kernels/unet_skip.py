"""U-Net skip path: ``ReLU(cat[a_i, u_{i+1}])`` as one write into a preallocated concatenation buffer.

The flat U-Net (``fastp2p.models.unet``) computes, before every up conv but the innermost, ``torch.cat`` of the skip
``a_i = LeakyReLU(h_i)`` and the up output ``u_{i+1}`` (read both, write the buffer) and then ``torch.relu`` of it (read
the buffer, write another): 4 passes over the level's activations. Here ``relu_cat(a, u)`` allocates the buffer once and
writes ``ReLU(a)`` into its first channels and ``ReLU(u)`` into the rest (``clamp_min(.., 0, out=slice)``: a strided
channel slice of a dense NCHW / NHWC buffer), 2 passes, the same values (``ReLU(LeakyReLU(h)) = ReLU(h)``, and dropout's
non-negative scaling commutes with ReLU, so no level needs special casing).

Autograd: one Function per call. It saves only the buffer (the up conv after it saves that same tensor for its weight
gradient: no extra memory, as ``torch.relu`` saves its result) and hands each producer ``threshold_backward`` of its
gradient slice (the formula ``torch.relu``'s backward uses, so gradients match bit for bit); the skip's slice adds to
the down path's LeakyReLU gradient exactly where autograd added the ``cat`` slice before. Memory format: the buffer
takes the skip's (channels-last stays channels-last). Under ``torch.compile`` (fullgraph) the Function computes
``relu(cat)`` instead: dynamo refuses ``out=`` into a strided view, and inductor fuses the two into one write itself.

``apply_fused_skips(model)`` switches every ``UnetGenerator`` inside ``model`` to ``FusedSkipUnetGenerator`` (a
subclass whose ``join`` is that call; same modules, same state_dict keys, so checkpoints load either way);
``remove_fused_skips`` switches back. It composes with ``apply_fused_kernels`` in either order and with either norm
backend (the norms are whatever modules the generator holds).

Norm writes (``apply_fused_skips(model, norm_writes=True)`` / ``FASTP2P_FUSED_SKIPS=norm``): the up level's norm
kernel itself applies the ReLU and stores into the buffer's last channels, so ``u_{i+1}`` is never written on its own
or read again: per joined level the buffer costs one read + write of the skip ``a_i`` only (relu_cat: of ``a_i`` and
``u_{i+1}``). One ``autograd.Function`` per level (``norm_relu_join``) runs the norm's Triton forward into the slice
(``FusedNormAct.forward_into``, running statistics moved as its forward moves them) and, backward, hands the norm
kernel the gradient's channel slice as it is (read through its strides, no copy) with ``act="relu"`` (so dz = (z > 0)
dy with z recomputed from x, the values ``threshold_backward`` of the buffer gives) and the skip ``threshold_backward``
of its slice. A level takes it when its ``up_norm`` is a ``FusedNormAct`` on the Triton backend with ``act="none"``,
no hooks on it (distillation's feature taps need the module called), no dropout after it in training (dropout levels
are the 2x2-8x8 ngf*8 ones at 256x256: small), and the conv output and skip share dtype and device; every other level,
and everything under ``torch.compile``, tracing or ONNX export, runs the relu_cat path. Opt-in (and the relu_cat path
kept) until bench/gpu.sh's train rung times it on a GPU. Not built: the down-path kernel also storing ``ReLU(h_i)``
into the first channels (a second output, and a backward taking two gradients), which would drop the skip's read too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastp2p.models.unet import UnetGenerator

from . import norm_act as _norm_act


def _fmt(t: Tensor):
    # channels-last when t is dense NHWC but not NCHW (1x1 / single-channel tensors are both: keep NCHW then)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _ReluCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, u: Tensor) -> Tensor:
        if a.dim() != 4 or u.dim() != 4 or a.shape[0] != u.shape[0] or a.shape[2:] != u.shape[2:]:
            raise ValueError(f"relu_cat: cannot concatenate {tuple(a.shape)} and {tuple(u.shape)} along channels")
        N, ca, H, W = a.shape
        ctx.ca = ca
        ctx.dtypes = (a.dtype, u.dtype)
        if torch.compiler.is_compiling():
            # dynamo refuses out= into a non-contiguous view; inductor fuses cat + ReLU into one write by itself
            out = torch.relu(torch.cat([a, u], 1))
            ctx.save_for_backward(out)
            return out
        out = torch.empty((N, ca + u.shape[1], H, W), dtype=torch.promote_types(a.dtype, u.dtype), device=a.device,
                          memory_format=_fmt(a))
        # clamp_min propagates NaN as torch.relu does
        torch.clamp_min(a, 0, out=out[:, :ca])
        torch.clamp_min(u, 0, out=out[:, ca:])
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        gi = torch.ops.aten.threshold_backward(g, out, 0)
        ga, gu = gi[:, :ctx.ca], gi[:, ctx.ca:]
        da, du = ctx.dtypes
        return (ga if ga.dtype == da else ga.to(da)), (gu if gu.dtype == du else gu.to(du))


def relu_cat(a: Tensor, u: Tensor) -> Tensor:
    """``torch.relu(torch.cat([a, u], 1))`` in one write (see the module docstring)."""
    return _ReluCat.apply(a, u)


def relu_cat_reference(a: Tensor, u: Tensor) -> Tensor:
    """What ``relu_cat`` replaces (the model's own two ops)."""
    return torch.relu(torch.cat([a, u], 1))


class _NormReluJoin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, skip: Tensor, weight, bias, norm) -> Tensor:
        N, ca, H, W = skip.shape
        buf = torch.empty((N, ca + x.shape[1], H, W), dtype=x.dtype, device=x.device, memory_format=_fmt(skip))
        if _norm_act._POISON:
            buf.fill_(float("nan"))
        torch.clamp_min(skip, 0, out=buf[:, :ca])
        mean, var, stats = norm.forward_into(x, buf[:, ca:], act="relu")
        ctx.save_for_backward(x, weight, bias, mean, var, buf)
        ctx.conf = (norm, stats, ca)
        ctx.mark_non_differentiable(mean, var)
        return buf

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias, mean, var, buf = ctx.saved_tensors
        norm, stats, ca = ctx.conf
        g = _norm_act._dense(g)  # a dense gradient (the up conv's) passes as it is; its slices are addressable
        gs = torch.ops.aten.threshold_backward(g[:, :ca], buf[:, :ca], 0) if ctx.needs_input_grad[1] else None
        dx, dw, db = norm.backward_from(g[:, ca:], x, mean, var, stats, act="relu")
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        return dx if ctx.needs_input_grad[0] else None, gs, dw, db, None


def norm_relu_join(norm: nn.Module, x: Tensor, skip: Tensor) -> Tensor:
    """``relu_cat(skip, norm(x))`` with ``norm`` (a Triton ``FusedNormAct``, ``act="none"``) writing ``ReLU(norm(x))``
    straight into the buffer (see the module docstring, "Norm writes")."""
    return _NormReluJoin.apply(x, skip, norm.weight, norm.bias, norm)


def _exporting() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or \
        torch.onnx.is_in_onnx_export()


class FusedSkipUnetGenerator(UnetGenerator):
    """``UnetGenerator`` whose up levels join through ``relu_cat`` and, with ``norm_writes``, through the up norms'
    own slice writes (built by ``apply_fused_skips``, not constructed directly)."""

    norm_writes = False

    def join(self, skip: Tensor, u: Tensor) -> Tensor:
        return relu_cat(skip, u)

    def slice_writer(self, i: int, c: Tensor, skip: Tensor) -> bool:
        """Whether up level ``i``'s norm can write ``ReLU(norm(c))`` into the join buffer with ``skip`` (the
        conditions in the module docstring)."""
        norm, drop = self.up_norm[i], self.up_dropout[i]
        return (isinstance(norm, _norm_act.FusedNormAct) and norm.backend == "triton" and norm.act == "none"
                and not (norm._forward_hooks or norm._forward_pre_hooks)
                and (type(drop) is nn.Identity or not drop.training)
                and c.dtype == skip.dtype and c.device == skip.device and c.numel() > 0
                and c.shape[0] == skip.shape[0] and c.shape[2:] == skip.shape[2:]
                and _norm_act.triton_usable(c.device))

    def forward(self, x: Tensor) -> Tensor:
        if not self.norm_writes or _exporting():
            return super().forward(x)
        u, skips = self.encode(x)
        n = self.num_downs
        joined = None  # the next level's input, when this level's norm wrote it
        for i in reversed(range(n)):
            if joined is not None:
                u = joined
            else:
                u = torch.relu(u) if i == n - 1 else self.join(skips[i], u)
            c = self.up[i](u)
            joined = None
            if i > 0 and self.slice_writer(i, c, skips[i - 1]):
                joined = norm_relu_join(self.up_norm[i], c, skips[i - 1])
            else:
                u = self.up_dropout[i](self.up_norm[i](c))
        return torch.tanh(u)


def apply_fused_skips(model: nn.Module, norm_writes: bool = False) -> nn.Module:
    """Switch every ``UnetGenerator`` in ``model`` (itself included) to ``FusedSkipUnetGenerator`` in place; returns
    ``model``. ``norm_writes``: the up norms write into the join buffers themselves where they can (Triton
    ``FusedNormAct``s: apply ``apply_fused_kernels`` too, in either order). Subclasses of ``UnetGenerator`` with their
    own forward are left alone; calling it again sets ``norm_writes`` anew."""
    for m in model.modules():
        if type(m) is UnetGenerator:
            m.__class__ = FusedSkipUnetGenerator
        if type(m) is FusedSkipUnetGenerator:
            m.norm_writes = bool(norm_writes)
    return model


def remove_fused_skips(model: nn.Module) -> nn.Module:
    """Undo ``apply_fused_skips`` in place; returns ``model``."""
    for m in model.modules():
        if type(m) is FusedSkipUnetGenerator:
            m.__class__ = UnetGenerator
            m.__dict__.pop("norm_writes", None)
    return model
