"""Files shipped inside the package (README.md beside this file says how each was made):
the built-in demo checkpoint and the UCI digits. Nothing heavy is imported here, so the
library finds the demo checkpoint without loading the training-data code."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def asset_path(name: str) -> Path:
    """Filesystem path of a file in ``htsr_cli/assets`` (a real path for a normal install)."""
    return Path(str(files(__name__) / name))


def default_checkpoint() -> Path:
    """Path of the built-in checkpoint: a small CNN trained on the UCI 8x8 digits.

    Made by ``scripts/train_default.py``; a safetensors file holding only the state dict.
    """
    return asset_path("digits_cnn.safetensors")


def digits_npz() -> Path:
    """Path of the UCI 8x8 hand-written digits (``scripts/make_digits_npz.py``)."""
    return asset_path("digits.npz")


__all__ = ["asset_path", "default_checkpoint", "digits_npz"]
