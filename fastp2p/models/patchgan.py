"""PatchGAN discriminators of pix2pix (the reference's ``NLayerDiscriminator`` and ``PixelDiscriminator``).

D sees the channel concatenation of (A, B). Layer indices inside ``self.model`` / ``self.net`` match the reference, so
its ``latest_net_D.pth`` keys load unchanged. Pure module: no device moves, no speed tricks.
"""

from __future__ import annotations

from torch import nn

from .norms import make_norm, uses_bias


def n_layers_problem(size: int, n_layers: int) -> str | None:
    """Why ``NLayerDiscriminator(n_layers)`` cannot take ``size`` x ``size`` inputs (None when it can): its 4x4 convs
    (pad 1) are stride 2 on the first ``n_layers`` levels (floor(s / 2)) and stride 1 on the last two (s - 1), so the
    logits are ``size // 2**n_layers - 2`` wide and need at least 1 (a conv larger than its input fails earlier)."""
    if size // 2 ** n_layers - 2 >= 1:
        return None
    most = max((n for n in range(1, 31) if size // 2 ** n - 2 >= 1), default=0)
    fix = f"use --n_layers_D {most} or fewer" if most else "use a larger --crop_size"
    return (f"--n_layers_D {n_layers}: a {size}x{size} input (--crop_size) shrinks to nothing after {n_layers} "
            f"stride-2 levels of the PatchGAN (it needs --crop_size >= {3 * 2 ** n_layers}); {fix}")


class NLayerDiscriminator(nn.Module):
    """``n_layers`` = 3 gives the 70x70 PatchGAN: 30x30 logits for a 256x256 input."""

    def __init__(self, input_nc: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"--n_layers_D must be >= 1, got {n_layers}")
        bias = uses_bias(norm)
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), make_norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: classifies every pixel on its own."""

    def __init__(self, input_nc: int = 6, ndf: int = 64, norm: str = "batch"):
        super().__init__()
        bias = uses_bias(norm)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, 1, 1, 0), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, ndf * 2, 1, 1, 0, bias=bias), make_norm(norm, ndf * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 2, 1, 1, 1, 0, bias=bias),
        )

    def forward(self, x):
        return self.net(x)
