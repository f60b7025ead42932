"""A convolution's geometry apart from its weights (kernel, stride, padding and its mode, dilation): the padding it
resolves to, its output size, the convolution run functionally, or built as a module."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.nn.functional as F
from torch import nn

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def as_tuple(value, dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a convolution except its weights; runs it functionally or builds the module."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str

    @cached_property
    def pads(self) -> list[tuple[int, int]]:
        """(before, after) padding per spatial dim, as nn.Conv resolves 'same' and 'valid'."""
        if self.padding == "valid":
            return [(0, 0)] * len(self.kernel_size)
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) for p in self.padding]

    @cached_property
    def _fpad(self) -> list[int]:
        return [p for pair in reversed(self.pads) for p in pair]

    def out_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, (lo, hi), d, k, s in zip(size, self.pads, self.dilation, self.kernel_size, self.stride))

    def conv(self, x, weight, bias, groups):
        conv = _CONV_FUNCTIONS[len(self.kernel_size)]
        if self.padding_mode != "zeros":
            return conv(F.pad(x, self._fpad, mode=self.padding_mode), weight, bias, self.stride, 0,
                        self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def module(self, in_channels, out_channels, groups, bias, weight, bias_value) -> nn.Module:
        layer = CONV_CLASSES[len(self.kernel_size)](
            in_channels, out_channels, self.kernel_size, self.stride, self.padding, self.dilation, groups,
            bias, self.padding_mode, device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(bias_value)
        return layer
