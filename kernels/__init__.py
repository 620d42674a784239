"""Triton kernels (installed as ``fastp2p.kernels``), one file per op; each holds the kernels, the launcher, the
custom-op + autograd + fake registration, a pure-torch implementation and an ``nn.Module``.

    norm_act   fused BatchNorm2d / InstanceNorm2d (+ affine) + LeakyReLU / ReLU / nothing, forward and backward
    unet_skip  the U-Net up path's ReLU(cat[skip, up]) as one write into a preallocated buffer (``apply_fused_skips``),
               optionally with the up norms' Triton kernels writing their slice of it (``norm_writes=True``)

``apply_fused_kernels(model, backend="triton" | "torch")`` swaps a model's norm + activation pairs in place without
changing its state_dict keys; ``remove_fused_kernels`` undoes it. On a machine without CUDA the Triton kernels run only
under the interpreter (``TRITON_INTERPRET=1`` set before this package is imported; the tests do that).
``FASTP2P_NORM_ACT_IMPL=v1|v2`` (or ``variant=``) picks the kernel implementation; v2 (the default in the interpreter,
v1 on a GPU until a GPU run confirms v2) needs at most 2 launches per norm layer each way and no host sync (see
``norm_act``'s docstring).
"""

from .norm_act import (
    ACTS,
    PAIRED_LISTS,
    STATS,
    VARIANTS,
    FusedNormAct,
    apply_fused_kernels,
    default_backend,
    default_variant,
    norm_act_reference,
    norm_kind,
    remove_fused_kernels,
    triton_usable,
)
from .unet_skip import FusedSkipUnetGenerator, apply_fused_skips, norm_relu_join, relu_cat, remove_fused_skips

__all__ = ["ACTS", "PAIRED_LISTS", "STATS", "VARIANTS", "FusedNormAct", "apply_fused_kernels", "default_backend",
           "default_variant", "norm_act_reference", "norm_kind", "remove_fused_kernels", "triton_usable",
           "FusedSkipUnetGenerator", "apply_fused_skips", "norm_relu_join", "relu_cat", "remove_fused_skips"]
