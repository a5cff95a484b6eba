"""A pruned checkpoint as a model directory: ``htsr prune HF_DIR -o OUT_DIR``.

``-o`` names a directory when it ends with ``/``, is an existing directory, or has no file
extension. The directory gets ``model.safetensors`` (the pruned weights, keys as in the input,
the pruning record in its metadata) and a copy of every other top-level file of the source
directory (``config.json``, ``generation_config.json``, the tokenizer files, ...), so that
``transformers``' ``from_pretrained(OUT_DIR)`` loads the pruned model. Weight files of the
source (``*.safetensors``, ``*.bin``, ``*.pt``, their ``*.index.json`` maps, ...) are not
copied: the one ``model.safetensors`` replaces them.

The directory is written beside its target under a temporary name and renamed into place when
complete, so a failed run leaves nothing; an existing ``OUT_DIR`` must be empty (it is
replaced), and is never the input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from htsr_cli.errors import InputError

#: The weights file of the output directory (what ``from_pretrained`` looks for first).
WEIGHTS_NAME = "model.safetensors"
#: Files of the source directory that hold weights (replaced by WEIGHTS_NAME, never copied).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".index.json",
)


def is_directory_output(output: str | os.PathLike | None) -> bool:
    """Whether ``-o`` names an output directory rather than a ``.safetensors`` file."""
    if output is None or str(output) == "-":
        return False
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        return True
    return Path(text).suffix == ""


def check_directory_output(output: str | os.PathLike, source: Any, *, structured: bool) -> None:
    """Fail before any work when ``-o OUT_DIR`` cannot be written."""
    out = Path(output)
    if structured:
        raise InputError(
            f"-o {output}: a directory output is for unstructured pruning (its config.json "
            "describes the original shapes, which structured pruning changes); write a "
            ".safetensors file instead"
        )
    if isinstance(source, str | os.PathLike) and str(source) != "-":
        src = os.path.realpath(source)
        if os.path.realpath(out) == src or (
            os.path.isdir(src) and os.path.realpath(out).startswith(src + os.sep)
        ):
            raise InputError(f"-o {output} is the input directory; htsr never modifies its input")
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write directory {output}: a file of that name exists")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"cannot write directory {output}: it exists and is not empty")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {output}: permission denied")


def side_files(source_dir: str | os.PathLike | None) -> list[Path]:
    """The top-level non-weight files of a model directory (what is copied); [] otherwise."""
    if source_dir is None or not os.path.isdir(source_dir):
        return []
    return sorted(
        p
        for p in Path(source_dir).iterdir()
        if p.is_file() and not p.name.lower().endswith(WEIGHT_SUFFIXES)
    )


@contextlib.contextmanager
def directory_output(
    output: str | os.PathLike, source_dir: str | os.PathLike | None
) -> Iterator[str]:
    """Yield the path to write the pruned weights to; on success the directory, with the
    source directory's other files copied, is renamed onto ``output``; on failure removed."""
    out = Path(output)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        yield os.path.join(tmp, WEIGHTS_NAME)
        for f in side_files(source_dir):
            shutil.copyfile(f, os.path.join(tmp, f.name))  # follows the hub cache's symlinks
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir():
            out.rmdir()  # empty (checked before any work): replaced
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "WEIGHTS_NAME",
    "WEIGHT_SUFFIXES",
    "check_directory_output",
    "directory_output",
    "is_directory_output",
    "side_files",
]
