"""Pure pix2pix modules: U-Net generator, PatchGAN discriminators, the reference's init, and its checkpoint keys."""

from __future__ import annotations

import torch
from torch import nn

from .norms import NORMS
from .patchgan import NLayerDiscriminator, PixelDiscriminator
from .unet import NUM_DOWNS, UnetGenerator, unet

NET_G = tuple(NUM_DOWNS)
NET_D = ("basic", "n_layers", "pixel")


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference's ``init_weights(init_type='normal')``: conv weights ~ N(0, gain), biases 0, batch-norm weights
    ~ N(1, gain) and biases 0."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, gain)
                nn.init.zeros_(m.bias)
    return net


def build_generator(netG="unet_256", input_nc=3, output_nc=3, ngf=64, norm="batch", use_dropout=True,
                    init=True) -> UnetGenerator:
    g = unet(netG, input_nc, output_nc, ngf, norm, use_dropout)
    return init_weights(g) if init else g


def build_discriminator(netD="basic", input_nc=6, ndf=64, n_layers_D=3, norm="batch", init=True) -> nn.Module:
    if netD == "basic":
        d = NLayerDiscriminator(input_nc, ndf, 3, norm)
    elif netD == "n_layers":
        d = NLayerDiscriminator(input_nc, ndf, n_layers_D, norm)
    elif netD == "pixel":
        d = PixelDiscriminator(input_nc, ndf, norm)
    else:
        raise ValueError(f"unknown --netD {netD!r}; choose one of {', '.join(NET_D)}")
    return init_weights(d) if init else d


__all__ = ["NET_D", "NET_G", "NORMS", "NLayerDiscriminator", "PixelDiscriminator", "UnetGenerator",
           "build_discriminator", "build_generator", "init_weights"]
