"""Datasets and files shipped with the package.

This module holds the datasets the CLI can use without a network (``--data digits``) and the path
of the built-in checkpoint that ``htsr analyze`` falls back to. Data files live in the
``htsr_cli/assets/`` directory (see its README.md for sources and licenses).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from htsr_cli.errors import InputError

__all__ = ["DEFAULT_CHECKPOINT", "DIGITS_SPLITS", "default_checkpoint", "load_digits"]

DIGITS_SPLITS = ("train", "test", "all")
_DIGITS_MAX = 16.0  # UCI digits pixels are counts 0..16


def _data_path(name: str) -> Path:
    """Filesystem path of a file in ``htsr_cli/data`` (a real path for a normal install)."""
    return Path(str(files("htsr_cli") / "assets" / name))


def default_checkpoint() -> Path:
    """Path of the built-in checkpoint: a small CNN trained on the UCI 8x8 digits.

    Made by ``scripts/train_default.py``; a safetensors file holding only the state dict.
    """
    return _data_path("digits_cnn.safetensors")


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
    with np.load(_data_path("digits.npz")) as npz:
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
