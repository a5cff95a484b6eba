"""Writing outputs: atomically for files, directly for stdout and special files.

A regular file is written to a temporary file beside it and renamed into place only when the
whole document is written, so a failed or interrupted run never leaves a half-written output.
A non-regular target that already exists (``/dev/stdout``, ``/dev/null``, a FIFO) is written
directly and never replaced.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from htsr_cli.errors import InputError, PipeClosed


def _is_special(path: Path) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not path.is_dir()
    except FileNotFoundError:
        return False


#: Files a checkpoint directory is read from (htsr_cli.io.checkpoint): never an output there.
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".index.json")


def _is_input(out: Path, inputs: Iterable[Any]) -> bool:
    target = os.path.realpath(out)
    for given in inputs:
        if not isinstance(given, str | os.PathLike) or str(given) == "-":
            continue  # in-memory sources and stdin are not files
        src = os.path.realpath(given)
        if target == src:
            return True
        if (
            os.path.isdir(src)
            and os.path.dirname(target) == src
            and out.name.endswith(_CHECKPOINT_SUFFIXES)
        ):
            return True
    return False


def check_writable(path: str | os.PathLike | None, inputs: Iterable[Any] = ()) -> None:
    """Fail early (before any work) when ``-o PATH`` cannot be written, or would replace one
    of ``inputs`` (input files, or checkpoint files in an input directory): htsr never
    modifies its input."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if _is_input(p, inputs):
        raise InputError(f"-o {path} is an input file; htsr never overwrites its input")
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a directory")
    if _is_special(p):
        if not os.access(p, os.W_OK):
            raise InputError(f"cannot write {p}: permission denied")
        return
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"cannot write {p}: permission denied")


def write_error(label: str, exc: OSError) -> InputError:
    """The one-line error of an output that cannot be written (a full disk, ``/dev/full``,
    an I/O error, a quota): the environment's, not a bug (exit 2)."""
    return InputError(f"cannot write {label}: {exc.strerror or type(exc).__name__}")


class _Output:
    """An output file as the block writing it sees it: a write that fails with an OSError
    becomes :func:`write_error`, so it is told apart from an error reading the inputs (which
    may happen in the same block)."""

    def __init__(self, fh: Any, label: str) -> None:
        self._fh = fh
        self._label = label

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise write_error(self._label, exc) from None

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._fh.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise write_error(self._label, exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextlib.contextmanager
def open_output(path: str | os.PathLike | None, mode: str = "w") -> Iterator[TextIO]:
    """Open an output for writing: stdout for None or ``-``, else atomically.

    On an exception inside the block the temporary file is removed and the target is left as
    it was. A write that fails (a full disk, ``/dev/full``) is an :class:`InputError` naming
    the output (exit 2), a closed pipe on stdout :class:`PipeClosed`.
    """
    if path is None or str(path) == "-":
        stream = sys.stdout.buffer if "b" in mode else sys.stdout
        try:
            yield _Output(stream, "stdout")  # type: ignore[misc]
            _Output(stream, "stdout").flush()
        except BrokenPipeError:
            raise PipeClosed() from None
        return
    p = Path(path)
    check_writable(p)
    if _is_special(p):
        try:
            fh = open(p, mode)
        except OSError as exc:
            raise write_error(str(p), exc) from None
        written = False
        try:
            yield _Output(fh, str(p))  # type: ignore[misc]
            written = True
        finally:
            try:
                fh.close()  # flushes: where a full device says so
            except OSError as exc:
                if written:
                    raise write_error(str(p), exc) from None
        return
    with atomic_path(p) as tmp, open(tmp, mode) as fh:
        yield _Output(fh, str(p))  # type: ignore[misc]
        try:
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise write_error(str(p), exc) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds (keeping the
    target's permissions) and removed when it fails: the one atomic-write body, used by
    :func:`open_output` and by writers that need a file name (matplotlib)."""
    p = Path(path)
    check_writable(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, stat.S_IMODE(os.stat(p).st_mode) if p.exists() else 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def jsonable(obj: Any) -> Any:
    """Deep copy with NaN/inf turned into None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def dump_json(doc: Mapping[str, Any], fh: TextIO) -> None:
    """A JSON document (NaN as null, indented, one trailing newline) to an open file: the
    one format of every JSON document htsr writes."""
    json.dump(jsonable(doc), fh, indent=2, allow_nan=False)
    fh.write("\n")


def write_json(doc: Mapping[str, Any], path: str | os.PathLike | None) -> None:
    """Write a JSON document to ``path`` atomically, or to stdout (see :func:`dump_json`)."""
    with open_output(path) as fh:
        dump_json(doc, fh)


#: ``-o`` extension -> format of the data commands (analyze, allocate, prune, diff).
EXT_FORMATS: Mapping[str, str] = {
    ".json": "json",
    ".csv": "csv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".txt": "table",
}


def choose_format(
    fmt: str | None,
    output: str | os.PathLike | None,
    stdout_is_tty: bool,
    allowed: tuple[str, ...],
    *,
    extensions: Mapping[str, str] = EXT_FORMATS,
    terminal: str = "table",
) -> str:
    """The output format of a command, the one rule of every command: ``--format`` if given
    (one of ``allowed``); else from the ``-o`` extension (``extensions``; JSON when the
    extension is unknown or its format not allowed); else ``terminal`` on a terminal and
    JSON in a pipe. ``htsr gate`` passes its own extensions (.xml = junit, .md = markdown,
    .txt = text) and ``terminal="text"``.

    Raises:
        InputError: ``fmt`` is not one of ``allowed``.
    """
    if fmt is not None:
        if fmt not in allowed:
            raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(allowed)}")
        return fmt
    if output is not None and str(output) != "-":
        guess = extensions.get(Path(output).suffix.lower(), "json")
        return guess if guess in allowed else "json"
    return terminal if stdout_is_tty else "json"
