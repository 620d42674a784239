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

Not built yet (needs a GPU to be worth it): the norm kernels writing the slice themselves (the down-path kernel a second
``ReLU(h_i)`` output into the first channels, the up-path kernel ``act="relu"`` into the rest), which would remove the
remaining read of ``a_i`` / ``u_{i+1}`` (see ``norm_act``'s docstring, "U-Net skip path").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastp2p.models.unet import UnetGenerator


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


class FusedSkipUnetGenerator(UnetGenerator):
    """``UnetGenerator`` whose up levels join through ``relu_cat`` (built by ``apply_fused_skips``, not constructed
    directly)."""

    def join(self, skip: Tensor, u: Tensor) -> Tensor:
        return relu_cat(skip, u)


def apply_fused_skips(model: nn.Module) -> nn.Module:
    """Switch every ``UnetGenerator`` in ``model`` (itself included) to ``FusedSkipUnetGenerator`` in place; returns
    ``model``. Subclasses of ``UnetGenerator`` with their own forward are left alone."""
    for m in model.modules():
        if type(m) is UnetGenerator:
            m.__class__ = FusedSkipUnetGenerator
    return model


def remove_fused_skips(model: nn.Module) -> nn.Module:
    """Undo ``apply_fused_skips`` in place; returns ``model``."""
    for m in model.modules():
        if type(m) is FusedSkipUnetGenerator:
            m.__class__ = UnetGenerator
    return model
