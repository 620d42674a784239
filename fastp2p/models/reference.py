"""A structural replica of the reference pix2pix networks (nested ``UnetSkipConnectionBlock``s, in-place activations),
written for fastp2p as the *faithful eager baseline*: the oracle of the key-adapter tests and the baseline rung of every
benchmark. Its state-dict keys are the reference's. Not used by the product's own training or inference path.
"""

from __future__ import annotations

import torch
from torch import nn

from .norms import make_norm, uses_bias


class RefUnetBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False,
                 norm="batch", use_dropout=False):
        super().__init__()
        self.outermost = outermost
        bias = uses_bias(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=bias)
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            model = [downconv, submodule, uprelu, nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1), nn.Tanh()]
        elif innermost:
            model = [downrelu, downconv, uprelu, nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=bias),
                     make_norm(norm, outer_nc)]
        else:
            model = [downrelu, downconv, make_norm(norm, inner_nc), submodule, uprelu,
                     nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=bias), make_norm(norm, outer_nc)]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        # The in-place LeakyReLU at the head of self.model rewrites x before cat reads it: the skip is activated.
        return torch.cat([x, self.model(x)], 1)


class RefUnetGenerator(nn.Module):
    def __init__(self, input_nc=3, output_nc=3, num_downs=8, ngf=64, norm="batch", use_dropout=True):
        super().__init__()
        block = RefUnetBlock(ngf * 8, ngf * 8, submodule=None, norm=norm, innermost=True)
        for _ in range(num_downs - 5):
            block = RefUnetBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout)
        block = RefUnetBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
        block = RefUnetBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
        block = RefUnetBlock(ngf, ngf * 2, submodule=block, norm=norm)
        self.model = RefUnetBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm=norm)

    def forward(self, x):
        return self.model(x)
