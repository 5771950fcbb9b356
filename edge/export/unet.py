"""A small UNet in plain torch.nn: long skip connections from each encoder level to the
decoder level of the same resolution. Imports torch: import this module lazily."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet"]


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, convs: int = 2):
        layers: list[nn.Module] = []
        for k in range(convs):
            layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1),
                       nn.ReLU(inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """3 encoder levels (double conv, 2x2 max-pool), a bottleneck, 3 decoder levels
    (upsample, concat with the matching encoder output, double conv), a 1x1 head.

    Upsampling goes to the skip tensor's own size (nearest, then a conv) rather than a
    stride-2 transposed conv, so any H, W >= 8 works and the export keeps H, W dynamic
    without divisibility guards.

    Args:
        in_channels: image channels.
        out_channels: mask channels.
        width: channels of the first level; doubled at each level down.
        convs: 3x3 convolutions per level (2: the classic double conv).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, width: int = 8,
                 convs: int = 2):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8]
        self.enc = nn.ModuleList([_DoubleConv(in_channels, w[0], convs),
                                  _DoubleConv(w[0], w[1], convs), _DoubleConv(w[1], w[2], convs)])
        self.bottleneck = _DoubleConv(w[2], w[3], convs)
        self.up = nn.ModuleList([nn.Conv2d(w[3], w[2], 1), nn.Conv2d(w[2], w[1], 1),
                                 nn.Conv2d(w[1], w[0], 1)])
        self.dec = nn.ModuleList([_DoubleConv(2 * w[2], w[2], convs),
                                  _DoubleConv(2 * w[1], w[1], convs),
                                  _DoubleConv(2 * w[0], w[0], convs)])
        self.head = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)
