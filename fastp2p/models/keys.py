"""Checkpoint key adapter between the reference's nested U-Net and fastp2p's flat one, both ways.

The reference nests ``UnetSkipConnectionBlock``s, each holding an ``nn.Sequential`` named ``model``:
  outermost: [0 downconv, 1 submodule, 2 uprelu, 3 upconv, 4 tanh]
  middle:    [0 downrelu, 1 downconv, 2 downnorm, 3 submodule, 4 uprelu, 5 upconv, 6 upnorm, (7 dropout)]
  innermost: [0 downrelu, 1 downconv, 2 uprelu, 3 upconv, 4 upnorm]
so its state-dict keys read ``model.model.0.weight``, ``model.model.1.model.1.weight``,
``model.model.1.model.3.model.1.weight``, ... The discriminators keep the
reference's indices and need no mapping beyond prefix stripping.
"""

from __future__ import annotations

import re

import torch

# Prefixes that wrappers add: DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_WRAPPER_PREFIX.sub("", k): v for k, v in sd.items()}


def _block_prefix(level: int) -> str:
    """Level 0 is the outermost block; its submodule sits at index 1, every other block's at index 3."""
    if level == 0:
        return "model.model."
    return "model.model.1." + "model.3." * (level - 1) + "model."


def _level_map(num_downs: int) -> dict[str, str]:
    """fastp2p module path -> reference module path, for every parametrised layer of the generator."""
    m: dict[str, str] = {}
    for i in range(num_downs):
        p = _block_prefix(i)
        if i == 0:
            m[f"down.{i}"], m[f"up.{i}"] = p + "0", p + "3"
        elif i == num_downs - 1:
            m[f"down.{i}"], m[f"up.{i}"], m[f"up_norm.{i}"] = p + "1", p + "3", p + "4"
        else:
            m[f"down.{i}"], m[f"down_norm.{i}"] = p + "1", p + "2"
            m[f"up.{i}"], m[f"up_norm.{i}"] = p + "5", p + "6"
    return m


def num_downs_of_reference(sd: dict[str, torch.Tensor]) -> int:
    """How many levels a reference U-Net state dict has (7 for unet_128, 8 for unet_256)."""
    sd = strip_wrappers(sd)
    level = -1
    while any(k.startswith(_block_prefix(level + 1)) for k in sd):
        level += 1
    if level < 0:
        raise KeyError("not a reference U-Net generator state dict (no 'model.model.' keys)")
    return level + 1


def from_reference(sd: dict[str, torch.Tensor], num_downs: int, fill_bias: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Reference G state dict -> fastp2p ``UnetGenerator`` state dict.

    ``num_batches_tracked`` entries are kept when present. Keys that do not map raise ``KeyError``, naming them.
    ``fill_bias`` (fastp2p key -> zeros) covers the reference's ``--norm none`` nets, which have no conv biases.
    """
    sd = strip_wrappers(sd)
    rev = {ref: ours for ours, ref in _level_map(num_downs).items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        if module in rev:
            out[f"{rev[module]}.{leaf}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"keys not in a reference unet with {num_downs} levels: {', '.join(unknown[:5])}")
    for k, v in (fill_bias or {}).items():
        out.setdefault(k, v)
    return out


def to_reference(sd: dict[str, torch.Tensor], num_downs: int) -> dict[str, torch.Tensor]:
    """fastp2p ``UnetGenerator`` state dict -> the reference's key layout (loadable by its ``networks.define_G``)."""
    fwd = _level_map(num_downs)
    out = {}
    for k, v in strip_wrappers(sd).items():
        module, _, leaf = k.rpartition(".")
        if module not in fwd:
            raise KeyError(f"not a fastp2p generator key: {k}")
        out[f"{fwd[module]}.{leaf}"] = v
    return out
