"""Datasets: the built-in digits, CIFAR-10/100 from their official files, tensor files; and the
on-device batch transforms of ``htsr finetune`` (augmentation, resizing to a model's input).

``--data digits`` and the built-in checkpoint need no network: their files live in
``htsr_cli/assets/`` (see its README.md for sources and licenses). CIFAR is read from either
official layout without torchvision: the python version's pickles through an unpickler that
accepts nothing but numpy arrays, or the binary version's fixed-size records. docs/finetune.md
describes every ``--data`` form.
"""

from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from htsr_cli.assets import default_checkpoint, digits_npz
from htsr_cli.errors import InputError, one_line

__all__ = [
    "DATA_FORMS",
    "DEFAULT_CHECKPOINT",
    "DIGITS_SPLITS",
    "Dataset",
    "augment",
    "channel_stats",
    "crop_flip",
    "crop_padding",
    "default_checkpoint",
    "fit_to_input",
    "load_dataset",
    "load_digits",
    "read_cifar",
    "read_tensor_file",
    "to_unit",
]

DIGITS_SPLITS = ("train", "test", "all")
_DIGITS_MAX = 16.0  # UCI digits pixels are counts 0..16


DEFAULT_CHECKPOINT: Path = default_checkpoint()


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load the UCI 8x8 hand-written digits shipped in ``htsr_cli/assets/digits.npz``.

    Args:
        split: ``"train"`` (1438 images), ``"test"`` (359 images, a fixed stratified 20%) or
            ``"all"`` (1797 images).

    Returns:
        ``(images, labels)``: float32 images of shape (N, 1, 8, 8) scaled to [0, 1], and int64
        labels of shape (N,) with values 0..9.

    Raises:
        InputError: unknown ``split``.
    """
    if split not in DIGITS_SPLITS:
        expected = ", ".join(DIGITS_SPLITS)
        raise InputError(f"unknown digits split {split!r}; expected one of {expected}")
    with np.load(digits_npz()) as npz:
        images = npz["images"]
        labels = npz["labels"]
        test_mask = npz["test_mask"].astype(bool)
    if split == "train":
        keep = ~test_mask
    elif split == "test":
        keep = test_mask
    else:
        keep = np.ones_like(test_mask)
    x = torch.from_numpy(images[keep].astype(np.float32) / _DIGITS_MAX).unsqueeze(1)
    y = torch.from_numpy(labels[keep].astype(np.int64))
    return x, y


# ---------------------------------------------------------------------------------------------
# --data: one entry point

#: The forms ``--data`` accepts (docs/finetune.md).
DATA_FORMS = ("digits", "cifar10:DIR", "cifar100:DIR", "FILE.safetensors|.pt|.pth|.npz")
_TENSOR_EXTS = (".safetensors", ".pt", ".pth", ".npz")


class Dataset(NamedTuple):
    """A train/test split held in memory. Images are (N, C, H, W), uint8 (0..255) or float;
    labels int64 in ``0..num_classes-1``. Unpacks as the 6-tuple of :func:`load_dataset`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    label: str


def load_dataset(spec: str) -> Dataset:
    """Read the data set that ``--data SPEC`` names.

    ``digits`` (the built-in 8x8 digits, 1438 train / 359 test images), ``cifar10:DIR`` or
    ``cifar100:DIR`` (either official layout, see :func:`read_cifar`), or a tensor file
    (:func:`read_tensor_file`).

    Returns:
        ``(train_x, train_y, test_x, test_y, num_classes, label)`` as a :class:`Dataset`.

    Raises:
        InputError: unknown form, missing or malformed files (one line).
    """
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if text == "digits":
        train_x, train_y = load_digits("train")
        test_x, test_y = load_digits("test")
        return Dataset(train_x, train_y, test_x, test_y, 10, "digits")
    if sep and kind in _CIFAR:
        if not rest:
            raise InputError(f"--data {text}: give the directory, e.g. {kind}:./data")
        return read_cifar(kind, rest)
    if text.lower().endswith(_TENSOR_EXTS):
        return read_tensor_file(text)
    raise InputError(f"unknown --data {text!r}; use one of: {', '.join(DATA_FORMS)}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (https://www.cs.toronto.edu/~kriz/cifar.html)


@dataclass(frozen=True)
class _CifarLayout:
    classes: int
    py_dir: str  # the folder the python archive unpacks to
    py_train: tuple[str, ...]
    py_test: tuple[str, ...]
    label_key: str
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: tuple[str, ...]
    label_bytes: int  # bytes before the pixels of a binary record
    label_index: int  # which of them is the label used


_CIFAR = {
    "cifar10": _CifarLayout(
        10,
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        1,
        0,
    ),
    # CIFAR-100 records carry (coarse, fine) labels; htsr trains on the 100 fine classes.
    "cifar100": _CifarLayout(
        100,
        "cifar-100-python",
        ("train",),
        ("test",),
        "fine_labels",
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
        2,
        1,
    ),
}
_PIXELS = 3 * 32 * 32  # R, G, B planes of 32x32, row-major, in every record

# The only globals a CIFAR pickle may name: what numpy needs to rebuild an ndarray.
_NUMPY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses every other global,
    so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":
            try:  # numpy 2 moved numpy.core to numpy._core
                return importlib.import_module("numpy._core.multiarray")._reconstruct
            except ImportError:
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return getattr(np, name)


def _find_layout(kind: str, directory: Path) -> tuple[str, Path]:
    """``("python"|"binary", folder)``: DIR itself or the folder its archive unpacks to."""
    lay = _CIFAR[kind]
    for layout, sub, names in (
        ("python", lay.py_dir, lay.py_train + lay.py_test),
        ("binary", lay.bin_dir, lay.bin_train + lay.bin_test),
    ):
        for folder in (directory, directory / sub):
            if all((folder / n).is_file() for n in names):
                return layout, folder
    raise InputError(
        f"{directory} is not a {kind} directory: expected the python version's files "
        f"({_names(lay.py_train, lay.py_test)}) or the binary version's "
        f"({_names(lay.bin_train, lay.bin_test)}), there or in {lay.py_dir}/ or {lay.bin_dir}/"
    )


def _names(train: tuple[str, ...], test: tuple[str, ...]) -> str:
    first = f"{train[0]} .. {train[-1]}" if len(train) > 1 else train[0]
    return ", ".join((first, *test))


def _read_pickle_batch(path: Path, lay: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            # encoding="bytes": the official files are Python 2 pickles of byte strings.
            doc = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise InputError(f"{path} is not a CIFAR python batch ({exc})") from None
    if not isinstance(doc, Mapping):
        raise InputError(f"{path} is not a CIFAR python batch (no dict inside)")
    doc = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in doc.items()}
    data, labels = doc.get("data"), doc.get(lay.label_key)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        raise InputError(f"{path}: 'data' must be a uint8 array of shape (N, {_PIXELS})")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise InputError(
            f"{path}: {lay.label_key!r} must hold one label per image ({data.shape[0]})"
        )
    return data, labels


def _read_binary_batch(path: Path, lay: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = lay.label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise InputError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records")
    rows = raw.reshape(-1, record)
    return rows[:, lay.label_bytes :], rows[:, lay.label_index].astype(np.int64)


def read_cifar(kind: str, directory: str | os.PathLike) -> Dataset:
    """Read CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels).

    ``directory`` holds the files of the python version (``data_batch_1``..``5`` and
    ``test_batch``; ``train`` and ``test`` for CIFAR-100), or of the binary version
    (``data_batch_1.bin``..``5.bin``, ``test_batch.bin``; ``train.bin``, ``test.bin``), or the
    folder an official archive unpacks to (``cifar-10-batches-py/`` and so on).

    Returns:
        a :class:`Dataset` of uint8 images (N, 3, 32, 32).

    Raises:
        InputError: missing directory, wrong layout, malformed file, label out of range.
    """
    if kind not in _CIFAR:
        raise InputError(f"unknown CIFAR kind {kind!r}; choose cifar10 or cifar100")
    lay, root = _CIFAR[kind], Path(directory)
    if not root.is_dir():
        raise InputError(f"{kind} directory {root} does not exist")
    layout, folder = _find_layout(kind, root)
    reader = _read_pickle_batch if layout == "python" else _read_binary_batch
    names = (lay.py_train, lay.py_test) if layout == "python" else (lay.bin_train, lay.bin_test)
    split = []
    for group in names:
        parts = [reader(folder / n, lay) for n in group]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        if y.size and (y.min() < 0 or y.max() >= lay.classes):
            raise InputError(f"{folder}: label {int(y.max())} out of range for {kind}")
        split += [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)]
    return Dataset(*split, lay.classes, f"{kind}:{folder}")


# ---------------------------------------------------------------------------------------------
# Tensor files

_TENSOR_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _tensor_dict(path: Path) -> dict[str, Any]:
    name = path.name.lower()
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(npz[k]) for k in npz.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        ValueError,
        RuntimeError,
        TypeError,
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
    ) as exc:  # TypeError: an npz array numpy cannot hand to torch
        raise InputError(f"cannot read {path}: {one_line(exc)}") from None
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def read_tensor_file(path: str | os.PathLike) -> Dataset:
    """Read a data set saved as tensors: a ``.safetensors``, ``.pt``/``.pth`` (loaded with
    ``weights_only=True``) or ``.npz`` (no pickles) file holding ``train_x``, ``train_y``,
    ``test_x``, ``test_y`` and optionally ``num_classes`` (else the largest label + 1).

    Images are (N, C, H, W) or (N, H, W) (one channel), uint8 or floating point; labels are
    integers.

    Raises:
        InputError: missing file or key, bad shape or dtype, label out of range.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} does not exist")
    d = _tensor_dict(p)
    missing = [k for k in _TENSOR_KEYS if k not in d]
    if missing:
        raise InputError(
            f"{p} lacks {', '.join(missing)} (a data file holds train_x, train_y, test_x, test_y)"
        )
    out = []
    for split in ("train", "test"):
        x, y = d[f"{split}_x"], d[f"{split}_y"]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise InputError(f"{p}: {split}_x and {split}_y must be tensors")
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise InputError(
                f"{p}: {split}_x must be uint8 or float images of shape "
                f"(N, C, H, W) or (N, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.is_complex():
            raise InputError(
                f"{p}: {split}_y must be {x.shape[0]} integer labels, got "
                f"{y.dtype} {tuple(y.shape)}"
            )
        out += [x if x.dtype == torch.uint8 else x.float(), y.long()]
    if out[0].shape[1:] != out[2].shape[1:] or out[0].shape[0] == 0 or out[2].shape[0] == 0:
        raise InputError(f"{p}: train_x and test_x must be non-empty images of one shape")
    top = int(max(out[1].max(), out[3].max()))
    n = d.get("num_classes")
    if n is not None and (
        not isinstance(n, torch.Tensor | int)
        or (isinstance(n, torch.Tensor) and (n.numel() != 1 or n.is_floating_point()))
    ):
        raise InputError(f"{p}: num_classes must be one integer")
    num_classes = int(n) if n is not None else top + 1
    low = min(int(out[1].min()), int(out[3].min()))
    if low < 0 or top >= num_classes:
        raise InputError(f"{p}: labels must lie in 0..{num_classes - 1}")
    return Dataset(*out, num_classes, str(p))


# ---------------------------------------------------------------------------------------------
# Batch transforms (on whatever device the batch lives)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """float32 images: uint8 pixels divided by 255, floating point ones as they are."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of ``to_unit(x)`` over every image and pixel
    (float64 sums, in chunks, so a whole CIFAR split needs no float copy)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for i in range(0, x.shape[0], chunk):
        part = to_unit(x[i : i + chunk]).double().transpose(0, 1).reshape(c, -1)
        total += part.sum(1)
        squares += (part * part).sum(1)
    count = x.numel() // c
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.clamp_min(1e-6).float()  # a constant channel must not divide by 0


def crop_padding(height: int) -> int:
    """Padding of the random crop: 4 pixels at 32x32 (the CIFAR standard), scaled with the
    image size (1 pixel at 8x8)."""
    return max(1, round(height / 8))


def crop_flip(
    n: int, pad: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the random crop offsets (each in ``0..2*pad``) and flips of ``n`` images from
    ``generator`` (a CPU generator, so that a run's random stream does not depend on the
    device). Returns ``(dy, dx, flips)``."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flips


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    pad: int | None = None,
    flip: bool = True,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels (default :func:`crop_padding`), then a
    horizontal flip of half the images, in one gather on ``x``'s device.

    Args:
        x: images (B, C, H, W).
        generator: the source of the offsets and flips (see :func:`crop_flip`).
        params: ``(dy, dx, flips)`` drawn beforehand instead (DDP ranks draw a whole global
            batch and take their slice, so that every rank's generator stays in step).
    """
    b, c, h, w = x.shape
    pad = crop_padding(h) if pad is None else pad
    if params is None:
        if generator is None:
            raise ValueError("augment needs a generator or params")
        params = crop_flip(b, pad, flip, generator)
    dy, dx, flips = (t.to(x.device) for t in params)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flipped crop reads right to left
    return padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def fit_to_input(x: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Make float images (B, C, H, W) fit a model input (C', H', W'): a single channel is
    replicated to C' channels (three channels are averaged for a one-channel model), and the
    image is resized bilinearly when its size differs."""
    channels, height, width = input_size
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise InputError(
                f"images with {x.shape[1]} channels do not fit a model that takes {channels}"
            )
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x
