"""Inference semantics of the generator, explicit.

- ``paper``: what the paper and the reference's ``test.py`` do by default (the model stays in train mode): every norm
  layer uses the statistics of the image itself and dropout is on (the paper's noise source). For batch norm the
  reference gets per-image statistics only because it tests at batch 1; here batch norm is evaluated per sample
  (instance-norm arithmetic with the batch-norm affine), so a batch of N images gives exactly what N single-image calls
  give (up to the random dropout masks), and running statistics are never touched.
- ``eval``: ``model.eval()``: running statistics, no dropout. Deterministic; the choice for video (temporal stability).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("paper", "eval")


class PerSampleBatchNorm(nn.Module):
    """A ``BatchNorm2d`` evaluated with each sample's own statistics; shares the wrapped layer's affine parameters."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


def with_mode(G: nn.Module, mode: str, dropout: bool = True, inplace: bool = False) -> nn.Module:
    """A generator set up for ``mode``; ``dropout=False`` turns paper-mode dropout off (deterministic)."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    G = G if inplace else copy.deepcopy(G)
    if mode == "eval":
        return G.eval().requires_grad_(False)
    for _name, m in list(G.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, PerSampleBatchNorm(child))
            elif isinstance(child, nn.Dropout) and not dropout:
                setattr(m, child_name, nn.Identity())
    G.train()  # dropout active; instance norms use input statistics in either mode
    return G.requires_grad_(False)


def to_model_input(img_uint8_hwc: torch.Tensor) -> torch.Tensor:
    """uint8 (N,)H,W,C -> float NCHW in [-1, 1], the reference's ToTensor + Normalize(0.5, 0.5)."""
    x = img_uint8_hwc if img_uint8_hwc.dim() == 4 else img_uint8_hwc[None]
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Model output NCHW in [-1, 1] -> uint8 NHWC, the reference's ``tensor2im`` ((y + 1) / 2 * 255, truncated)."""
    return ((y.float().clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8).permute(0, 2, 3, 1)
