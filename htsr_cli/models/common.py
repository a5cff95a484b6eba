"""Small helpers shared by the built-in architectures."""

from __future__ import annotations

from torch import nn


def channels(base: int, width: float) -> int:
    """``base * width`` rounded half up, at least 1 (a width multiplier never empties a layer)."""
    return max(1, int(base * width + 0.5))


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions and unit/zero BatchNorm, the usual from-scratch init
    for ReLU CNNs; Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
