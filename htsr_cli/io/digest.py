"""sha256 of input files, each hashed once per process on one background thread.

This module imports neither torch nor numpy, so the CLI can start hashing a checkpoint before it
imports torch: on a 2-core machine the ~0.5 s/GB of hashing then runs beside the ~1.2 s of
``import torch`` instead of beside the eigen-solves (benchmarks/README.md). A result is keyed
by the file's identity and modification time, so a file rewritten in between is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any

from htsr_cli.errors import InputError

_CHUNK = 8 << 20  # hashlib releases the GIL on chunks this large

_lock = threading.Lock()
_jobs: dict[tuple[Any, ...], Future[dict[str, Any]]] = {}
_todo: queue.SimpleQueue[tuple[str, Future[dict[str, Any]]]] = queue.SimpleQueue()
_worker: threading.Thread | None = None


def _reset() -> None:
    """A forked child has none of the parent's threads: start from scratch there (a child
    waiting on the parent's queue would hang)."""
    global _lock, _jobs, _todo, _worker
    _lock, _jobs, _todo, _worker = threading.Lock(), {}, queue.SimpleQueue(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset)


def _identity(path: str) -> tuple[Any, ...]:
    st = os.stat(path)
    return (
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def _hash(path: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {path} to hash it: {exc.strerror or exc}") from None
    return {"path": path, "bytes": size, "sha256": digest.hexdigest()}


def _work(todo: queue.SimpleQueue[tuple[str, Future[dict[str, Any]]]]) -> None:
    # Files are hashed one after another: parallel hashes would only compete for the disk.
    while True:
        path, fut = todo.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(_hash(path))
            except BaseException as exc:  # handed to the caller's thread by record()
                fut.set_exception(exc)


def start(path: str) -> Future[dict[str, Any]]:
    """Queue ``path`` for hashing (idempotent while the file is unchanged); returns its future.

    Raises:
        InputError: the file cannot be stat'ed.
    """
    global _worker
    try:
        key = _identity(path)
    except OSError as exc:
        raise InputError(f"cannot read {path} to hash it: {exc.strerror or exc}") from None
    with _lock:
        fut = _jobs.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = _jobs[key] = Future()
            _todo.put((path, fut))
            if _worker is None or not _worker.is_alive():
                # A daemon thread: Ctrl-C or an error never waits for a big file's hash.
                _worker = threading.Thread(
                    target=_work, args=(_todo,), name="htsr-sha256", daemon=True
                )
                _worker.start()
    return fut


def prefetch(path: str | None) -> None:
    """Start hashing ``path`` when it is a regular file; ignore anything else (a directory's
    files are started by the checkpoint reader once it knows which ones it reads). Only rank 0
    of a torchrun job hashes (it alone writes the report): other ranks would read every byte
    again for nothing."""
    if os.environ.get("RANK", "0") != "0":
        return
    if path and os.path.isfile(path):
        try:
            start(path)
        except InputError:
            pass  # the reader reports an unreadable file with its own message


def record(path: str) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file, waiting for its hash.

    Raises:
        InputError: the file cannot be read.
    """
    result = start(path).result()
    return dict(result, path=path)
