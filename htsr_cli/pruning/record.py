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
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import InputError, one_line
from ..output import open_output
from ..plans import check_schema, require

RECORD_KEY = "htsr.prune"
RECORD_SCHEMA = "htsr.pruned-checkpoint/1"
MODES = ("structured", "unstructured")

# safetensors dtype codes (the format's own names)
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                      layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically, one tensor at a time.

    ``layout`` lists every (key, dtype, shape) in file order, known before any data is read, so
    the header goes first and peak memory is one tensor, not the checkpoint. ``tensors`` must
    yield the same keys, dtypes and shapes in the same order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in layout:
        if dtype not in _DTYPE_CODES:
            raise InputError(f"cannot write tensor {key!r}: dtype {dtype} has no safetensors code")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
    expected = iter(layout)
    with open_output(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for key, tensor in tensors:
            want_key, want_dtype, want_shape = next(expected)
            if (key, tensor.dtype, tuple(tensor.shape)) != (want_key, want_dtype, want_shape):
                raise RuntimeError(f"tensor {key!r} does not match the announced layout")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            fh.write(memoryview(flat.view(torch.uint8).numpy()))
        if next(expected, None) is not None:  # a short file must not replace the target
            raise RuntimeError("fewer tensors than announced in the safetensors header")


def record_metadata(record: Mapping[str, Any],
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``__metadata__`` of a pruned checkpoint: ``base`` (e.g. the input's metadata) plus the
    record under :data:`RECORD_KEY`."""
    meta = dict(base or {})
    meta["format"] = "pt"
    meta[RECORD_KEY] = json.dumps({"schema": RECORD_SCHEMA, **record}, allow_nan=False,
                                  separators=(",", ":"))
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
        if not isinstance(doc["arch"], str) or not isinstance(doc["history"], list) \
                or not isinstance(doc["shapes"], dict):
            raise InputError(f"{label}: a structured record needs 'arch' (text), 'history' "
                             "(list) and 'shapes' (object)")
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
    from ..models import resolve_arch

    size = resolve_arch(arch).input_size
    return (size[0] if in_channels == 3 else in_channels, size[1], size[2])


def trace_size(arch: str, in_channels: int = 3) -> tuple[int, int, int]:
    """The input size Torch-Pruning traces ``arch`` with: its input size, except for the
    built-in ImageNet layouts (:data:`IMAGENET_TRACE` pixels square)."""
    from ..models import resolve_arch

    size = input_size(arch, in_channels)
    if resolve_arch(arch).family == "imagenet":
        return (size[0], IMAGENET_TRACE, IMAGENET_TRACE)
    return size


def example_input(input_size: tuple[int, ...] | list[int],
                  model: torch.nn.Module) -> torch.Tensor:
    """A zero batch of one on the model's device: enough for Torch-Pruning to trace."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    return torch.zeros((1, *[int(v) for v in input_size]), device=device)


def replay_history(model: torch.nn.Module, history: list[Any],
                   input_size: tuple[int, ...] | list[int]) -> None:
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
                model, example_inputs=example_input(input_size, model), verbose=False)
        graph.load_pruning_history([[str(n), bool(o), [int(i) for i in idx]]
                                    for n, o, idx in history])
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        first = one_line(exc, 160)
        raise InputError(f"cannot replay the pruning history on this architecture ({first}); "
                         "is it the one the checkpoint was pruned from?") from None
    finally:
        model.train(training)


def _check_shapes(model: torch.nn.Module, shapes: Mapping[str, Any], label: str) -> None:
    state = model.state_dict()
    for key, want in shapes.items():
        if key in state and list(state[key].shape) != list(want):
            raise InputError(f"{label}: replaying the pruning history gives {key} "
                             f"{tuple(state[key].shape)}, the record says {tuple(want)}")


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def load_pruned_model(path: str | os.PathLike, arch: str | None = None,
                      num_classes: int | None = None, *, width: float | None = None,
                      trust_pickle: bool = False) -> torch.nn.Module:
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
    from ..models import build_model, load_state

    record = read_prune_record(path)
    label = str(path)
    if record is not None and record["mode"] == "structured":
        rec_arch = record["arch"]
        if arch is not None and arch.strip().lower() != rec_arch.lower():
            raise InputError(f"--arch {arch} does not match {label}, which was pruned from "
                             f"{rec_arch}")
        rec_classes = record.get("num_classes")
        if num_classes is not None and rec_classes is not None and num_classes != rec_classes:
            raise InputError(f"--num-classes {num_classes} does not match {label} "
                             f"({rec_classes} classes)")
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
        raise InputError(f"{label} is not a structurally pruned checkpoint; give --arch to "
                         "build its model")
    if width is None:
        width = float((record or {}).get("width") or 1.0)
    model = build_for(arch, path, num_classes or (record or {}).get("num_classes"), width=width,
                      trust_pickle=trust_pickle)
    load_state(model, path, trust_pickle=trust_pickle)
    model.eval()
    return model


def build_for(arch: str, source: Any, num_classes: int | None = None, *, width: float = 1.0,
              in_channels: int = 3, trust_pickle: bool = False) -> torch.nn.Module:
    """A fresh ``arch`` sized for a checkpoint: without ``num_classes``, the classifier gets
    as many outputs as the checkpoint's classifier weight has rows (the arch's default when
    the checkpoint lacks it). Weights are not loaded."""
    from ..models import build_model, classifier_name

    model = build_model(arch, num_classes, width=width, in_channels=in_channels)
    if num_classes is not None:
        return model
    key = classifier_name(model) + ".weight"
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(
        source, trust_pickle=trust_pickle)
    try:
        ref = next((r for r in ckpt.tensors() if r.key == key), None)
    finally:
        if ckpt is not source:
            ckpt.close()
    rows = int(ref.shape[0]) if ref is not None and len(ref.shape) == 2 else None
    if rows is not None and rows != dict(model.named_modules())[key[:-7]].weight.shape[0]:
        model = build_model(arch, rows, width=width, in_channels=in_channels)
    return model


__all__ = ["RECORD_KEY", "RECORD_SCHEMA", "write_safetensors",
           "record_metadata", "read_prune_record", "validate_record", "replay_history",
           "load_pruned_model", "build_for", "example_input", "input_size", "trace_size",
           "IMAGENET_TRACE"]
