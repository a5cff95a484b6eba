"""The pruned-checkpoint format: one safetensors file plus a JSON pruning record.

A pruned checkpoint is a plain safetensors file (so ``htsr analyze`` reads it like any other)
whose ``__metadata__`` holds the key ``"htsr.prune"``: a JSON string with schema
``htsr.pruned-checkpoint/1`` (docs/prune.md). For structured pruning the record carries
Torch-Pruning's pruning history, which rebuilds the pruned shapes from the original
architecture without pickled code: build the arch, trace it with
``DependencyGraph().build_dependency``, replay ``load_pruning_history``, then load the weights.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from htsr_cli.errors import InputError, one_line
from htsr_cli.io import schemas
from htsr_cli.io.checkpoint import Checkpoint, open_checkpoint
from htsr_cli.io.documents import check_schema, require

RECORD_KEY = schemas.PRUNE_META
RECORD_SCHEMA = schemas.PRUNED_CHECKPOINT
MODES = ("structured", "unstructured")


def record_metadata(
    record: Mapping[str, Any], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``__metadata__`` of a pruned checkpoint: ``base`` (e.g. the input's metadata) plus the
    record under :data:`RECORD_KEY`."""
    meta = dict(base or {})
    meta["format"] = "pt"
    meta[RECORD_KEY] = json.dumps(
        {"schema": RECORD_SCHEMA, **record}, allow_nan=False, separators=(",", ":")
    )
    return meta


def validate_record(doc: Any, label: str) -> dict[str, Any]:
    """Check a pruning record enough for :func:`load_pruned_model`."""
    if not isinstance(doc, dict):
        raise InputError(f"{label}: the {RECORD_KEY!r} record is not a JSON object")
    check_schema(doc, RECORD_SCHEMA, label)
    require(doc, ("mode",), label)
    if doc["mode"] not in MODES:
        raise InputError(f"{label}: unknown pruning mode {doc['mode']!r}")
    if doc["mode"] == "structured":
        require(doc, ("arch", "history", "shapes"), label)
        if (
            not isinstance(doc["arch"], str)
            or not isinstance(doc["history"], list)
            or not isinstance(doc["shapes"], dict)
        ):
            raise InputError(
                f"{label}: a structured record needs 'arch' (text), 'history' "
                "(list) and 'shapes' (object)"
            )
    return doc


def read_prune_record(path: str | os.PathLike | Checkpoint) -> dict[str, Any] | None:
    """The pruning record of a checkpoint written by ``htsr prune``, or None for any other
    checkpoint (a torch file, or safetensors without the record).

    Raises:
        InputError: unreadable checkpoint, or a record that is not valid JSON of schema
            ``htsr.pruned-checkpoint/1``.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    try:
        text = ckpt.metadata().get(RECORD_KEY)
    finally:
        if ckpt is not path:
            ckpt.close()
    if text is None:
        return None
    label = f"{ckpt.path or 'checkpoint'} (pruning record)"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{label} is not valid JSON: {exc.msg}") from None
    return validate_record(doc, label)


#: Built-in ImageNet-layout models end in adaptive pooling, so their dependency graph is the same
#: at any resolution, and tracing them at 64x64 instead of 224x224 is enough.
IMAGENET_TRACE = 64


def input_size(arch: str, in_channels: int = 3) -> tuple[int, int, int]:
    """``arch``'s input size for a model built with ``in_channels`` (3, the builder's default,
    keeps the arch's own channel count, e.g. 1 for a grey-image user factory)."""
    from htsr_cli.models import resolve_arch

    size = resolve_arch(arch).input_size
    return (size[0] if in_channels == 3 else in_channels, size[1], size[2])


def trace_size(arch: str, in_channels: int = 3) -> tuple[int, int, int]:
    """The input size Torch-Pruning traces ``arch`` with: its input size, except for the
    built-in ImageNet layouts (:data:`IMAGENET_TRACE` pixels square)."""
    from htsr_cli.models import resolve_arch

    size = input_size(arch, in_channels)
    if resolve_arch(arch).family == "imagenet":
        return (size[0], IMAGENET_TRACE, IMAGENET_TRACE)
    return size


def example_input(input_size: tuple[int, ...] | list[int], model: torch.nn.Module) -> torch.Tensor:
    """A zero batch of one on the model's device: enough for Torch-Pruning to trace."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    return torch.zeros((1, *[int(v) for v in input_size]), device=device)


def replay_history(
    model: torch.nn.Module, history: list[Any], input_size: tuple[int, ...] | list[int]
) -> None:
    """Re-apply a Torch-Pruning history to a freshly built model, in place.

    The model is traced in eval mode: a training-mode trace would update BatchNorm running
    statistics with the dummy input.
    """
    import torch_pruning as tp

    training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input(input_size, model), verbose=False
            )
        graph.load_pruning_history(
            [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history]
        )
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        first = one_line(exc, 160)
        raise InputError(
            f"cannot replay the pruning history on this architecture ({first}); "
            "is it the one the checkpoint was pruned from?"
        ) from None
    finally:
        model.train(training)


def _check_shapes(model: torch.nn.Module, shapes: Mapping[str, Any], label: str) -> None:
    state = model.state_dict()
    for key, want in shapes.items():
        if key in state and list(state[key].shape) != list(want):
            raise InputError(
                f"{label}: replaying the pruning history gives {key} "
                f"{tuple(state[key].shape)}, the record says {tuple(want)}"
            )


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def load_pruned_model(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    *,
    width: float | None = None,
    trust_pickle: bool = False,
) -> torch.nn.Module:
    """Rebuild a model from a checkpoint, pruned or not.

    A structurally pruned checkpoint (its record has ``mode: structured``) is rebuilt from the
    architecture in its record: build it, trace it, replay the pruning history, then load the
    weights strictly. ``arch``, ``num_classes`` and ``width``, when given, must match the
    record. Any other checkpoint (unstructured pruning, or none) is loaded into
    ``build_model(arch, num_classes, width=width)``; ``arch`` then comes from the argument or
    the record, and ``num_classes`` defaults to the checkpoint's classifier size.

    Raises:
        InputError: no architecture known, a mismatch with the record, or weights that do not
            fit the rebuilt model.
    """
    from htsr_cli.models import build_model, load_state

    record = read_prune_record(path)
    label = str(path)
    if record is not None and record["mode"] == "structured":
        rec_arch = record["arch"]
        if arch is not None and arch.strip().lower() != rec_arch.lower():
            raise InputError(
                f"--arch {arch} does not match {label}, which was pruned from {rec_arch}"
            )
        rec_classes = record.get("num_classes")
        if num_classes is not None and rec_classes is not None and num_classes != rec_classes:
            raise InputError(
                f"--num-classes {num_classes} does not match {label} ({rec_classes} classes)"
            )
        rec_width = float(record.get("width") or 1.0)
        if width is not None and not _same(width, rec_width):
            raise InputError(f"--width {width:g} does not match {label} (width {rec_width:g})")
        in_channels = int(record.get("in_channels") or 3)
        model = build_model(rec_arch, rec_classes, width=rec_width, in_channels=in_channels)
        size = record.get("trace_size") or trace_size(rec_arch, in_channels)
        replay_history(model, record["history"], size)
        _check_shapes(model, record["shapes"], label)
        load_state(model, path, strict=True)
        model.eval()
        return model
    arch = arch or (record or {}).get("arch")
    if not arch:
        raise InputError(
            f"{label} is not a structurally pruned checkpoint; give --arch to build its model"
        )
    if width is None:
        width = float((record or {}).get("width") or 1.0)
    model = build_for(
        arch,
        path,
        num_classes or (record or {}).get("num_classes"),
        width=width,
        trust_pickle=trust_pickle,
    )
    load_state(model, path, trust_pickle=trust_pickle)
    model.eval()
    return model


def build_for(
    arch: str,
    source: Any,
    num_classes: int | None = None,
    *,
    width: float = 1.0,
    in_channels: int = 3,
    trust_pickle: bool = False,
) -> torch.nn.Module:
    """A fresh ``arch`` sized for a checkpoint: without ``num_classes``, the classifier gets
    as many outputs as the checkpoint's classifier weight has rows (the arch's default when
    the checkpoint lacks it). Weights are not loaded."""
    from htsr_cli.models import build_model, classifier_name

    model = build_model(arch, num_classes, width=width, in_channels=in_channels)
    if num_classes is not None:
        return model
    key = classifier_name(model) + ".weight"
    ckpt = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(source, trust_pickle=trust_pickle)
    )
    try:
        ref = next((r for r in ckpt.tensors() if r.key == key), None)
    finally:
        if ckpt is not source:
            ckpt.close()
    rows = int(ref.shape[0]) if ref is not None and len(ref.shape) == 2 else None
    if rows is not None and rows != dict(model.named_modules())[key[:-7]].weight.shape[0]:
        model = build_model(arch, rows, width=width, in_channels=in_channels)
    return model


__all__ = [
    "RECORD_KEY",
    "RECORD_SCHEMA",
    "record_metadata",
    "read_prune_record",
    "validate_record",
    "replay_history",
    "load_pruned_model",
    "build_for",
    "example_input",
    "input_size",
    "trace_size",
    "IMAGENET_TRACE",
]
