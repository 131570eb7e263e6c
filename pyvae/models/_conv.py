"""Convolutional encoder and decoder stacks shared by ConvVAE and VQVAE.

Each stage is a 3x3 convolution (stride 2 to downsample, padding 1), so any H, W work: a stride-2
stage maps s to ceil(s / 2), and its mirror in the decoder (a transposed convolution with
``output_padding = 1 - s % 2``) maps ceil(s / 2) back to exactly s.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import positive_ints


def conv_encoder(in_channels: int, channels: Sequence[int], strides: Sequence[int],
                 size: tuple[int, int]) -> tuple[nn.Sequential, list[tuple[int, int]]]:
    """The stages ``in_channels -> channels[0] -> ... -> channels[-1]`` (each conv + ReLU) and the
    spatial size before each stage plus the final one."""
    layers: list[nn.Module] = []
    sizes = [size]
    prev = in_channels
    for ch, stride in zip(channels, strides):
        layers += [nn.Conv2d(prev, ch, 3, stride=stride, padding=1), nn.ReLU()]
        h, w = sizes[-1]
        sizes.append(((h + stride - 1) // stride, (w + stride - 1) // stride))
        prev = ch
    return nn.Sequential(*layers), sizes


def conv_decoder(out_channels: int, channels: Sequence[int], strides: Sequence[int],
                 sizes: Sequence[tuple[int, int]]) -> nn.Sequential:
    """The mirror of :func:`conv_encoder`: from ``channels[-1]`` at ``sizes[-1]`` back to
    ``sizes[0]``, ending in a 3x3 convolution to ``out_channels`` with no activation (the
    likelihood's parameters)."""
    layers: list[nn.Module] = []
    for i in reversed(range(len(channels))):
        ch_out = channels[i - 1] if i > 0 else channels[0]
        if strides[i] == 1:
            layers.append(nn.Conv2d(channels[i], ch_out, 3, padding=1))
        else:
            h, w = sizes[i]
            layers.append(nn.ConvTranspose2d(channels[i], ch_out, 3, stride=2, padding=1,
                                             output_padding=(1 - h % 2, 1 - w % 2)))
        layers.append(nn.ReLU())
    layers.append(nn.Conv2d(channels[0], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


def check_channels(channels) -> tuple[int, ...]:
    return positive_ints("channels", channels)
