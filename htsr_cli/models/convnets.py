"""Non-residual-stage CNNs of the thesis: VGG19-BN and DenseNet-40 (CIFAR), and MobileNetV2 in
a CIFAR and in torchvision's ImageNet layout (``features.N...``, ``classifier.1``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from htsr_cli.models.common import channels, init_weights

# VGG19: 16 3x3 convolutions in five stages, "M" is a 2x2 max-pool.
VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: conv(+bias)-BN-ReLU stack, then one ``classifier``
    Linear on the 512-channel 1x1 map (the CIFAR variant has no 4096-wide FC layers)."""

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG19_CONFIG,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inp = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = channels(int(v), width)
                layers += [nn.Conv2d(inp, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(True)]
                inp = out
        self.features = nn.Sequential(*layers)
        # Identity at 32x32 (five pools leave 1x1); lets other input sizes work too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(inp, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` new maps, concatenated to its input."""

    def __init__(self, inp: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(inp, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression 1.0: channels unchanged) and 2x2 average pooling."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(inp, out, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet for CIFAR without bottlenecks (Huang et al.): a 3x3 stem of 16 channels, three
    dense blocks of (depth-4)/3 layers, two transitions, BN-ReLU, global pooling and ``fc``.
    DenseNet-40 with growth 12 has 16 + 3*12*12 = 448 channels at the end."""

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        k = channels(growth, width)
        inp = channels(16, width)
        self.conv1 = nn.Conv2d(in_channels, inp, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for b in range(3):
            blocks.append(nn.Sequential(*(DenseLayer(inp + i * k, k) for i in range(n))))
            inp += n * k
            if b < 2:
                blocks.append(Transition(inp, inp))
        self.block1, self.trans1, self.block2, self.trans2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.block3(self.trans2(self.block2(x)))
        return self.fc(self.avgpool(self.relu(self.bn(x))).flatten(1))


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    """Conv-BN-ReLU6 as a Sequential, so its parameters are named ``.0`` and ``.1`` like
    torchvision's ``Conv2dNormActivation``."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped for t=1), 3x3 depthwise, linear 1x1 projection;
    residual add when stride is 1 and the channel count is unchanged."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand))
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, channels c, repeats n, stride s) of Sandler et al., Table 2.
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class MobileNetV2(nn.Module):
    """MobileNetV2. ``imagenet=True``: torchvision's layout and names (stride-2 stem, dropout 0.2
    before ``classifier.1``). ``imagenet=False``: the usual CIFAR adaptation, stride 1 in the
    stem and in the 24-channel stage, so a 32x32 input reaches the last stage at 4x4."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        inp = channels(32, width)
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, inp, stride=2 if imagenet else 1)]
        for i, (t, c, n, s) in enumerate(MOBILENETV2_SETTINGS):
            out = channels(c, width)
            stride = 1 if (i == 1 and not imagenet) else s
            for j in range(n):
                features.append(InvertedResidual(inp, out, stride if j == 0 else 1, t))
                inp = out
        last = channels(1280, width)
        features.append(_conv_bn_relu6(inp, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2 if imagenet else 0.0), nn.Linear(last, num_classes)
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))
