"""Run the real CLI in this process: ``htsr_cli.cli.main(argv)`` with stdin, stdout, stderr,
the environment and the working directory swapped for the call.

Most CLI tests check exit codes, one-line errors and outputs, which do not need a new Python
process (and its ~2 s of ``import torch``). Tests where the process matters (pipes, SIGPIPE,
SIGINT, a terminal) keep using real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
from typing import Any

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
