"""U-Net generator of pix2pix, written flat instead of as nested blocks.

The reference (junyanz/pytorch-CycleGAN-and-pix2pix, ``UnetSkipConnectionBlock``) builds the net recursively and relies
on an in-place LeakyReLU that runs *before* ``torch.cat`` reads the skip tensor, so every skip connection carries the
activated value ``LeakyReLU(norm(conv(.)))``. Here that data flow is spelled out:

    down path, level i = 1..n:  h_i = norm_i(conv_i(a_{i-1}))    (no norm at level 1 or at the innermost level n)
                                a_i = LeakyReLU_0.2(h_i)           (a_0 = the input image, no activation)
    up path, innermost first:   u_n = upnorm_n(upconv_n(ReLU(h_n)))
                                u_i = dropout_i(upnorm_i(upconv_i(ReLU(cat[a_i, u_{i+1}]))))
    output:                     tanh(upconv_1(ReLU(cat[a_1, u_2])))

Keys differ from the reference; ``fastp2p.models.keys`` maps them both ways. This module is pure: no device moves, no
compile, no speed tricks (those live in ``fastp2p.perf``).
"""

from __future__ import annotations

import torch
from torch import nn

from .norms import make_norm, uses_bias

NUM_DOWNS = {"unet_128": 7, "unet_256": 8}


def size_problem(size: int, num_downs: int, flag: str = "--crop_size") -> str | None:
    """Why the U-Net cannot take ``size`` x ``size`` inputs (None when it can), naming ``flag`` and the sizes it takes.

    Each down level is a 4x4 stride-2 conv (pad 1: floor(s / 2)) and each up level a stride-2 transposed conv
    (exactly 2s), and level i's skip is concatenated with the up path coming back to it, so every level's size must
    halve exactly and the innermost must be at least 1x1: the sizes that work are the positive multiples of
    2**num_downs (unet_256: 256, 512, 768, ...; unet_128: 128, 256, 384, ...). Anything else fails inside the net
    (a concat size mismatch, a batch norm over 1x1, or a conv larger than its input)."""
    m = 2 ** num_downs
    if size >= m and size % m == 0:
        return None
    name = {v: k for k, v in NUM_DOWNS.items()}.get(num_downs, f"a {num_downs}-level U-Net")
    below, above = (size // m) * m, (size // m + 1) * m
    nearest = f"{below} or {above}" if below else f"{above}"
    return (f"{flag} {size}: --netG {name} ({num_downs} stride-2 levels) takes a multiple of {m} only ({m}, {2 * m}, "
            f"{3 * m}, ...); use {flag} {nearest}")


class UnetGenerator(nn.Module):
    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        self.num_downs = num_downs
        bias = uses_bias(norm)
        # (in_channels, out_channels) of the down conv at each level, outermost first; the reference's
        # UnetGenerator: ngf, 2ngf, 4ngf, 8ngf, then 8ngf down to the bottleneck.
        widths = [ngf * min(2**i, 8) for i in range(num_downs)]
        ins = [input_nc] + widths[:-1]
        self.down = nn.ModuleList()
        self.down_norm = nn.ModuleList()
        self.up = nn.ModuleList()
        self.up_norm = nn.ModuleList()
        self.up_dropout = nn.ModuleList()
        # The down path's LeakyReLU(0.2) as modules (no parameters, so state_dict keys are unchanged) so that speed
        # transforms (fastp2p.kernels.apply_fused_kernels) can fuse each with the norm before it.
        self.down_act = nn.ModuleList()
        for i in range(num_downs):
            outermost, innermost = i == 0, i == num_downs - 1
            # The reference's outermost down conv uses use_bias too (it has no norm after it, but keeps the flag).
            self.down.append(nn.Conv2d(ins[i], widths[i], 4, 2, 1, bias=bias))
            self.down_norm.append(nn.Identity() if (outermost or innermost) else make_norm(norm, widths[i]))
            # innermost: no activation here; the up path starts from ReLU(h_n)
            self.down_act.append(nn.Identity() if innermost else nn.LeakyReLU(0.2))
            up_in = widths[i] if innermost else widths[i] * 2
            up_out = output_nc if outermost else ins[i]
            self.up.append(nn.ConvTranspose2d(up_in, up_out, 4, 2, 1, bias=True if outermost else bias))
            self.up_norm.append(nn.Identity() if outermost else make_norm(norm, up_out))
            # Dropout sits on the ngf*8 blocks between the bottleneck and the 4ngf->8ngf level: levels 5..n-1
            # (1-based), i.e. num_downs - 5 blocks, never the innermost one.
            dropout = use_dropout and 4 <= i < num_downs - 1
            self.up_dropout.append(nn.Dropout(0.5) if dropout else nn.Identity())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path: (h_n, [a_1, ..., a_{n-1}])."""
        skips = []
        a = x
        n = self.num_downs
        for i in range(n):
            a = self.down_act[i](self.down_norm[i](self.down[i](a)))
            if i != n - 1:
                skips.append(a)
        return a, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, skips = self.encode(x)
        n = self.num_downs
        for i in reversed(range(n)):
            u = torch.relu(u) if i == n - 1 else self.join(skips[i], u)
            u = self.up_dropout[i](self.up_norm[i](self.up[i](u)))
        return torch.tanh(u)

    def join(self, skip: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The input of an up level: ``ReLU(cat[skip, u])`` (``fastp2p.kernels.unet_skip`` writes it in one pass)."""
        return torch.relu(torch.cat([skip, u], 1))


def unet(netG: str = "unet_256", input_nc: int = 3, output_nc: int = 3, ngf: int = 64, norm: str = "batch",
         use_dropout: bool = True) -> UnetGenerator:
    if netG not in NUM_DOWNS:
        raise ValueError(f"unknown --netG {netG!r}; choose one of {sorted(NUM_DOWNS)}")
    return UnetGenerator(input_nc, output_nc, NUM_DOWNS[netG], ngf, norm, use_dropout)
