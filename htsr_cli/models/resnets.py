"""Residual networks: ResNet (CIFAR and torchvision ImageNet layouts) and WideResNet.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``, ...) so that torchvision checkpoints load unchanged into the
ImageNet layout, and CIFAR and ImageNet ResNets name their layers alike.
"""

from __future__ import annotations

from torch import Tensor, nn

from htsr_cli.models.common import channels, init_weights


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)


def _downsample(inp: int, out: int, stride: int) -> nn.Sequential | None:
    """1x1 projection (+BN) for the shortcut when the block changes shape, else None."""
    if stride == 1 and inp == out:
        return None
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual add (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inp, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inp, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet with four stages of 64/128/256/512 planes (times ``width``).

    ``imagenet=False`` is the CIFAR variant (3x3 stride-1 stem, no max-pool: 32x32 inputs keep
    their resolution into stage 1); ``imagenet=True`` is torchvision's layout (7x7 stride-2 stem
    and a 3x3 stride-2 max-pool).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        stem = channels(64, width)
        if imagenet:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(in_channels, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        # Identity has no parameters, so the CIFAR layout keeps torchvision's module names.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
        inp = stem
        stages = []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            planes = channels(planes, width)
            blocks = []
            for j in range(depth):
                blocks.append(block(inp, planes, 2 if (i > 0 and j == 0) else 1))
                inp = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation block of a WideResNet: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus shortcut.

    When the shape changes the shortcut is a 1x1 convolution applied to the *activated* input,
    as in Zagoruyko & Komodakis's reference design.
    """

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(inp, out, stride)
        self.bn2 = nn.BatchNorm2d(out)
        self.conv2 = _conv3x3(out, out)
        self.shortcut = (
            None if stride == 1 and inp == out else nn.Conv2d(inp, out, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: a 16-channel stem, three groups of (depth-4)/6 blocks with
    16k/32k/64k channels (strides 1, 2, 2), final BN-ReLU, global pooling and ``fc``."""

    def __init__(
        self, depth: int = 28, widen: float = 10.0, *, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        inp = 16
        groups = []
        for base, stride in ((16, 1), (32, 2), (64, 2)):
            out = channels(base, widen)
            groups.append(
                nn.Sequential(
                    *(
                        WideBlock(inp if j == 0 else out, out, stride if j == 0 else 1)
                        for j in range(n)
                    )
                )
            )
            inp = out
        self.layer1, self.layer2, self.layer3 = groups
        self.bn = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn(x))).flatten(1))
