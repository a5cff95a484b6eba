"""The model zoo: built-in architectures by name, user factories, checkpoint loading and size.

``--arch NAME`` picks a built-in from :data:`ARCHS`; ``--arch package.module:function`` names a
user factory, which is imported only for that form (see :func:`resolve_arch`). Built-ins are the
thesis's CIFAR models (``resnet18``, ``resnet34``, ``resnet101``, ``resnet152``, ``vgg19``,
``densenet40``, ``wrn28-10``, ``mobilenetv2``; 32x32 inputs) and four models in torchvision's
ImageNet layout and parameter names (``imagenet-resnet18``, ``imagenet-resnet34``,
``imagenet-resnet50``, ``imagenet-mobilenet_v2``; 224x224), so torchvision checkpoints load
unchanged with :func:`load_state`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from htsr_cli.errors import InputError, one_line
from htsr_cli.io.checkpoint import Checkpoint, open_checkpoint
from htsr_cli.models.convnets import VGG, DenseNet, MobileNetV2
from htsr_cli.models.resnets import BasicBlock, Bottleneck, ResNet, WideResNet

__all__ = [
    "ARCHS",
    "ArchSpec",
    "build_model",
    "classifier_name",
    "count_macs",
    "count_params",
    "load_state",
    "resolve_arch",
]

CIFAR_INPUT = (3, 32, 32)
IMAGENET_INPUT = (3, 224, 224)
_MAX_LISTED = 5  # mismatches named in a load_state error before "(+N more)"


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: how to build it and what it expects.

    ``factory(num_classes=..., width=..., in_channels=...)`` returns a fresh ``nn.Module``.
    ``input_size`` is (C, H, W) for the default ``in_channels=3``; ``num_classes`` is the default
    number of classes (10 for CIFAR models, 1000 for ImageNet ones).
    """

    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    family: str  # "cifar" | "imagenet" | "user"
    description: str


def _imagenet(cls: Callable[..., nn.Module], name: str, **fixed: Any) -> Callable[..., nn.Module]:
    """Factory for an ImageNet-layout model: its shapes must match torchvision's exactly, so a
    width multiplier is refused rather than silently producing unloadable checkpoints."""

    def factory(*, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> nn.Module:
        if width != 1.0:
            raise InputError(
                f"arch {name} has torchvision's fixed shapes; width must be 1 (got {width:g})"
            )
        return cls(num_classes=num_classes, in_channels=in_channels, imagenet=True, **fixed)

    return factory


def _wrn(*, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> nn.Module:
    return WideResNet(28, 10 * width, num_classes=num_classes, in_channels=in_channels)


def _cifar_resnet(block: type, depths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    return partial(ResNet, block, depths, imagenet=False)


def _specs() -> dict[str, ArchSpec]:
    basic, bottle = BasicBlock, Bottleneck
    cifar = [
        ("resnet18", _cifar_resnet(basic, (2, 2, 2, 2)), "ResNet-18 (BasicBlock), 3x3 stem"),
        ("resnet34", _cifar_resnet(basic, (3, 4, 6, 3)), "ResNet-34 (BasicBlock), 3x3 stem"),
        ("resnet101", _cifar_resnet(bottle, (3, 4, 23, 3)), "ResNet-101 (Bottleneck), 3x3 stem"),
        ("resnet152", _cifar_resnet(bottle, (3, 8, 36, 3)), "ResNet-152 (Bottleneck), 3x3 stem"),
        ("vgg19", VGG, "VGG19 with BatchNorm, one Linear classifier"),
        ("densenet40", DenseNet, "DenseNet-40, growth 12, no bottleneck, compression 1"),
        ("wrn28-10", _wrn, "WideResNet-28-10 (pre-activation); width scales k=10"),
        ("mobilenetv2", partial(MobileNetV2, imagenet=False), "MobileNetV2, stride-1 stem"),
    ]
    imagenet = [
        ("imagenet-resnet18", _imagenet(ResNet, "imagenet-resnet18",
                                        block=basic, depths=(2, 2, 2, 2)), "torchvision resnet18"),
        ("imagenet-resnet34", _imagenet(ResNet, "imagenet-resnet34",
                                        block=basic, depths=(3, 4, 6, 3)), "torchvision resnet34"),
        ("imagenet-resnet50", _imagenet(ResNet, "imagenet-resnet50",
                                        block=bottle, depths=(3, 4, 6, 3)), "torchvision resnet50"),
        ("imagenet-mobilenet_v2", _imagenet(MobileNetV2, "imagenet-mobilenet_v2"),
         "torchvision mobilenet_v2"),
    ]  # fmt: skip
    specs = {n: ArchSpec(n, f, CIFAR_INPUT, 10, "cifar", d) for n, f, d in cifar}
    specs.update({n: ArchSpec(n, f, IMAGENET_INPUT, 1000, "imagenet", d) for n, f, d in imagenet})
    return specs


ARCHS: dict[str, ArchSpec] = _specs()


def _import_factory(arch: str) -> Callable[..., Any]:
    """Import ``module:attr[.attr]``; the current directory is searchable, as for ``python -m``."""
    module_name, _, attr_path = arch.partition(":")
    if not module_name or not attr_path:
        raise InputError(f"--arch {arch!r}: expected 'package.module:function'")
    cwd_added = os.getcwd() not in sys.path and "" not in sys.path
    if cwd_added:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, or any error raised by the module body
        raise InputError(
            f"--arch {arch}: cannot import {module_name!r}: {type(exc).__name__}: "
            f"{one_line(exc, 300, join=True)}"
        ) from None
    finally:
        if cwd_added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"--arch {arch}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--arch {arch}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def _default_classes(factory: Callable[..., Any]) -> int:
    """A user factory's class count: its ``num_classes`` attribute, else the default of its
    ``num_classes`` parameter, else 10."""
    value = getattr(factory, "num_classes", None)
    if value is None:
        try:
            param = inspect.signature(factory).parameters.get("num_classes")
        except (TypeError, ValueError):  # builtins without a signature
            param = None
        value = param.default if param is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 10


def resolve_arch(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` for a built-in name (case-insensitive) or a user factory.

    ``"package.module:function"`` imports that module (from ``sys.path`` plus the current
    directory) and uses ``function`` as the factory; this is the only way user code is imported.
    Its ``input_size`` is the function's ``input_size`` attribute if it has one, else (3, 32, 32).

    Raises:
        InputError: unknown name (with suggestions), or a module that cannot be imported, a
            missing attribute, or an attribute that is not callable.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise InputError("--arch is empty; expected a built-in name or 'package.module:function'")
    arch = arch.strip()
    if ":" not in arch:
        spec = ARCHS.get(arch.lower())
        if spec is None:
            close = difflib.get_close_matches(arch.lower(), ARCHS, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(
                f"unknown arch {arch!r}{hint}; built-ins: {', '.join(ARCHS)}; "
                "or pass 'package.module:function'"
            )
        return spec
    factory = _import_factory(arch)
    size = getattr(factory, "input_size", CIFAR_INPUT)
    if not (
        isinstance(size, tuple | list)
        and len(size) == 3
        and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise InputError(f"--arch {arch}: input_size must be (C, H, W) positive ints, got {size!r}")
    doc = (inspect.getdoc(factory) or "").strip().splitlines()
    return ArchSpec(
        name=arch,
        factory=factory,
        input_size=(int(size[0]), int(size[1]), int(size[2])),
        num_classes=_default_classes(factory),
        family="user",
        description=doc[0] if doc else f"user factory {arch}",
    )


def _user_kwargs(spec: ArchSpec, given: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments to pass to a user factory: only those asked for, and only if the
    factory accepts them (a clear error beats a TypeError from inside the user's code)."""
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        return given
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return given
    for key, value in given.items():
        if key not in params:
            raise InputError(f"--arch {spec.name}: the factory takes no {key} (asked {value})")
    return given


def build_model(
    arch: str, num_classes: int | None = None, *, width: float = 1.0, in_channels: int = 3
) -> nn.Module:
    """Build a fresh, randomly initialised model.

    Args:
        arch: built-in name or ``"package.module:function"`` (see :func:`resolve_arch`).
        num_classes: outputs of the classifier; None for the architecture's default.
        width: channel multiplier (CIFAR models; e.g. 0.25..2.5 as in the thesis); channel
            counts are rounded to integers, at least 1. ImageNet-layout models require 1.
        in_channels: channels of the input images.

    A user factory is called with ``num_classes`` only if given, and ``width``/``in_channels``
    only if they differ from 1 and 3.

    Raises:
        InputError: unknown arch, invalid sizes, or a factory that fails or returns no module.
    """
    spec = resolve_arch(arch)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not (math.isfinite(width) and width > 0)
    ):
        raise InputError(f"width must be a positive number, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"in_channels must be a positive integer, got {in_channels!r}")
    if spec.family == "user":
        given: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        if width != 1.0:
            given["width"] = width
        if in_channels != 3:
            given["in_channels"] = in_channels
        kwargs = _user_kwargs(spec, given)
    else:
        kwargs = {
            "num_classes": spec.num_classes if num_classes is None else num_classes,
            "width": float(width),
            "in_channels": in_channels,
        }
    try:
        model = spec.factory(**kwargs)
    except InputError:
        raise
    except Exception as exc:  # a user factory's own failure: report it on one line
        raise InputError(
            f"--arch {spec.name}: factory failed: {type(exc).__name__}: "
            f"{one_line(exc, 300, join=True)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise InputError(
            f"--arch {spec.name}: factory returned a {type(model).__name__}, not an nn.Module"
        )
    model.htsr_arch = spec.name  # plain attribute: named in load_state errors, not in state dicts
    return model


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the model's final ``nn.Linear`` (last registered), the layer that
    pruning leaves intact because its outputs are the classes.

    Raises:
        InputError: the model has no ``nn.Linear``.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise InputError(f"{_arch_name(model)} has no nn.Linear layer to treat as its classifier")
    return last


def _arch_name(model: nn.Module) -> str:
    name = getattr(model, "htsr_arch", None)
    return name if isinstance(name, str) else type(model).__name__


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _mismatches(target: dict[str, torch.Tensor], refs: dict[str, Any], strict: bool) -> list[str]:
    """Missing, unexpected and mis-shaped keys, interleaved so that the first few listed show
    every kind of problem there is."""
    missing, unexpected = [], []
    if strict:
        missing = [
            f"missing {k}"
            for k in target
            if k not in refs and not k.endswith("num_batches_tracked")
        ]
        unexpected = [f"unexpected {k}" for k in refs if k not in target]
    shapes = [
        f"shape {k} {_shape(t.shape)} vs checkpoint {_shape(refs[k].shape)}"
        for k, t in target.items()
        if k in refs and tuple(t.shape) != refs[k].shape
    ]
    kinds = [missing, unexpected, shapes]
    return [kind[i] for i in range(max(map(len, kinds))) for kind in kinds if i < len(kind)]


def load_state(
    model: nn.Module, source: Any, *, strict: bool = True, trust_pickle: bool = False
) -> None:
    """Copy a checkpoint's tensors into ``model`` in place, one tensor at a time.

    ``source`` is a path (any layout :func:`~htsr_cli.io.checkpoint.open_checkpoint` reads), a
    state dict, an ``nn.Module`` or an open :class:`~htsr_cli.io.checkpoint.Checkpoint` (left
    open). Values are cast to the model's dtype and device. A BatchNorm ``num_batches_tracked``
    missing from the checkpoint is not an error: older torchvision files lack it.

    ``strict=True`` requires the same keys; ``strict=False`` skips missing and unexpected keys.
    A shape mismatch is an error in both modes (as in ``nn.Module.load_state_dict``).

    Raises:
        InputError: unreadable checkpoint, or one line naming the first mismatches, e.g.
            ``checkpoint x.pth does not fit arch resnet18: missing layer1.0.conv1.weight;
            shape conv1.weight (64,3,3,3) vs checkpoint (64,3,7,7) (+12 more; 3 of 122 match)``.
    """
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(source, trust_pickle=trust_pickle)
    )
    try:
        refs = {ref.key: ref for ref in ckpt.tensors()}
        target = model.state_dict()
        problems = _mismatches(target, refs, strict)
        if problems:
            matched = sum(k in refs and tuple(t.shape) == refs[k].shape for k, t in target.items())
            more = f"+{len(problems) - _MAX_LISTED} more; " if len(problems) > _MAX_LISTED else ""
            where = f" {ckpt.path}" if ckpt.path else ""
            raise InputError(
                f"checkpoint{where} does not fit arch {_arch_name(model)}: "
                + "; ".join(problems[:_MAX_LISTED])
                + f" ({more}{matched} of {len(target)} tensors match)"
            )
        with torch.no_grad():
            for key, tensor in target.items():
                if key in refs:
                    tensor.copy_(ckpt.load(key))
    finally:
        if ckpt is not source:
            ckpt.close()


def count_params(model: nn.Module, *, nonzero: bool = False) -> int:
    """Number of parameters (each shared parameter once); ``nonzero=True`` counts only the
    entries that are not exactly zero, i.e. what survives unstructured pruning."""
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _macs_of(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call for a batch of one (biases and activations excluded)."""
    if isinstance(module, _CONV):
        # Each output value is a dot product over (in_channels / groups) x kernel inputs.
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, _CONV_T):
        # Each input value is scattered to (out_channels / groups) x kernel outputs.
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return inp.numel() * per_input
    assert isinstance(module, nn.Linear)
    return out.numel() * module.in_features


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the convolutions (grouped and depthwise included) and Linear
    layers for one sample of shape ``input_size`` (C, H, W).

    Runs one forward pass on zeros in eval mode under ``torch.no_grad()`` with forward hooks;
    a module called twice counts twice. Training modes are restored afterwards.

    Raises:
        InputError: ``input_size`` is not positive ints, or the model cannot run on it.
    """
    if not (
        isinstance(input_size, tuple | list)
        and len(input_size) >= 1
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise InputError(f"input size must be positive integers like (3, 32, 32), got {input_size}")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    total = 0

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        nonlocal total
        total += _macs_of(module, args[0], out)

    modes = {m: m.training for m in model.modules()}
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, _CONV + _CONV_T + (nn.Linear,))
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    except Exception as exc:  # shape errors from the model: the size does not fit it
        first_line = one_line(exc)
        raise InputError(
            f"{_arch_name(model)} cannot run on an input of size {tuple(input_size)}: "
            f"{first_line[:200]}"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total
