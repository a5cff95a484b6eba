"""Run the real CLI in this process: ``htsr_cli.cli.main(argv)`` with stdin, stdout, stderr,
the environment and the working directory swapped for the call.

Most CLI tests check exit codes, one-line errors and outputs, which do not need a new Python
process (and its ~2 s of ``import torch``). Tests where the process matters (pipes, SIGPIPE,
SIGINT, a terminal) keep using real subprocesses.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from typing import Any

import pytest

from htsr_cli.cli import main

_LOCK = threading.Lock()  # one in-process run at a time: streams and cwd are process-wide


def run(
    argv: list[Any],
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess[str]:
    """``htsr ARGV`` in process; returns what a subprocess run would (code, stdout, stderr)."""
    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with _LOCK, _swapped(stdin, out, err, env, cwd):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["htsr", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _swapped(
    stdin: str | None,
    out: io.StringIO,
    err: io.StringIO,
    env: dict[str, str] | None,
    cwd: str | os.PathLike | None,
) -> Any:
    saved = sys.stdin, sys.stdout, sys.stderr
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    sys.stdin = io.StringIO(stdin or "")
    sys.stdout, sys.stderr = out, err
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        if env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
        os.chdir(saved_cwd)


def run_in_pty(
    args: list[str], env: dict[str, str], *, columns: int | None = None, timeout: float = 300
) -> tuple[int, str, str]:
    """Run a real process with stdout on a pseudo-terminal (``columns`` wide when given, and
    ``COLUMNS`` set to it) and stderr a pipe; (rc, stdout, stderr). Skips where the sandbox
    has no pseudo-terminals."""
    try:
        master, slave = pty.openpty()
    except OSError as exc:
        pytest.skip(f"no pty: {exc}")
    if columns is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = {**env, "COLUMNS": str(columns)}
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(timeout=timeout)
    return proc.returncode, b"".join(chunks).decode(errors="replace"), err.decode()
