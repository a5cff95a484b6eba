"""The run directory of ``htsr finetune``: what is written every epoch, and reading it back.

A run directory holds

- ``args.json``: the run's arguments (``htsr.run-args/1``); ``--resume DIR`` restarts from them;
- ``history.jsonl``: one JSON object per finished epoch;
- ``model.safetensors``: the weights after the last finished epoch (with the ``htsr.prune``
  record of a structurally pruned model, so the file alone rebuilds it, and an ``htsr.run``
  record naming the epoch);
- ``state.pt``: everything else exact resumption needs (optimizer, RNG states, epoch, ...),
  plain tensors and containers only, so it loads with ``weights_only=True``;
- ``final.json``: the summary (``htsr.run/1``), once the run has finished.

Every file is replaced atomically (temp file + rename, :mod:`htsr_cli.io.output`). The epoch's files
are written in the order history, model, state: ``state.pt`` is the commit record, and
SIGINT/SIGTERM are held back while the three are written so an interrupt cannot split them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a state is read or written: plot history reads JSON
    import torch

from htsr_cli.errors import InputError, one_line
from htsr_cli.io import schemas
from htsr_cli.io.documents import check_schema, read_json, require
from htsr_cli.io.output import jsonable, open_output, write_json

ARGS_SCHEMA = schemas.RUN_ARGS
RUN_SCHEMA = schemas.RUN
ARGS, HISTORY, FINAL, MODEL, STATE = (
    "args.json",
    "history.jsonl",
    "final.json",
    "model.safetensors",
    "state.pt",
)
#: safetensors metadata key of the epoch record in model.safetensors.
RUN_META = schemas.RUN_META
PRUNE_META = schemas.PRUNE_META


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then raise KeyboardInterrupt if one
    came. Signal handlers can only be set in the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {
        s: signal.signal(s, lambda sig, _frame: received.append(sig))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(record), allow_nan=False)


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def check_new(self) -> None:
        """Refuse a directory that already holds a run, or that cannot be created."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"-o {self.path}: exists and is not a directory")
        used = [n for n in (ARGS, STATE, HISTORY, MODEL) if self.file(n).exists()]
        if used:
            raise InputError(
                f"{self.path} already holds a run ({used[0]}); continue it with "
                f"--resume {self.path}, or choose another directory"
            )
        parent = self.path if self.path.is_dir() else self.path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise InputError(f"cannot create run directory {self.path}: permission denied")

    def check_resumable(self) -> None:
        if not self.file(ARGS).is_file():
            raise InputError(f"{self.path} is not an htsr finetune run directory (no {ARGS})")

    def remove_stale_temps(self) -> list[str]:
        """Remove the temporary files a run killed while saving left behind (``.state.pt.
        XXXX.tmp`` and the like, :func:`htsr_cli.io.output.atomic_path`); returns their names.
        Only on resume, by the one process that writes: nothing else writes there then."""
        removed = []
        for name in (ARGS, HISTORY, FINAL, MODEL, STATE):
            for tmp in self.path.glob(f".{name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp.name)
        return removed

    # -- arguments ----------------------------------------------------------------------------

    def write_args(self, args: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json({"schema": ARGS_SCHEMA, **args}, self.file(ARGS))

    def read_args(self) -> dict[str, Any]:
        self.check_resumable()
        doc, label = read_json(self.file(ARGS))
        check_schema(doc, ARGS_SCHEMA, label)
        doc.pop("schema")
        return doc

    # -- per-epoch state ----------------------------------------------------------------------

    def read_state(self) -> dict[str, Any] | None:
        """``state.pt`` (None when no epoch has finished yet), checked against the model file."""
        path = self.file(STATE)
        if not path.is_file():
            # No epoch finished (a run stopped in its first epoch) only when nothing an epoch
            # writes is there; else the run is not whole and resuming would retrain from
            # scratch over its weights and history.
            found = [n for n in (MODEL, HISTORY, FINAL) if self.file(n).exists()]
            if found:
                raise InputError(
                    f"{self.path} is not a whole run: {found[0]} is there but {STATE} is "
                    "missing, so it cannot be resumed exactly; restore it, or start a new "
                    "run in another directory"
                )
            return None
        try:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: unpickling errors vary
            raise InputError(f"cannot read {path}: {one_line(exc)}") from None
        if not isinstance(state, dict) or "epoch" not in state:
            raise InputError(f"{path} is not an htsr finetune state file")
        model_epoch = self.model_epoch()
        if model_epoch != state["epoch"]:
            raise InputError(
                f"{self.path}: {MODEL} (epoch {model_epoch}) and {STATE} (epoch "
                f"{state['epoch']}) disagree: the run was killed while saving; "
                "start it again"
            )
        return state

    def model_epoch(self) -> int | None:
        from safetensors import safe_open

        path = self.file(MODEL)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        try:
            return int(json.loads(meta[RUN_META])["epoch"])
        except (KeyError, ValueError, TypeError):
            return None

    def read_history(
        self, upto: int | None = None, required: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """The epoch records in file order (the one reader of ``history.jsonl``), cut to epochs
        ``<= upto`` (a record written after the last saved state is not part of the run).

        Raises:
            InputError: a line is not a JSON object with an integer ``epoch`` and the
                ``required`` fields (the message names the line).
        """
        path = self.file(HISTORY)
        if not path.is_file():
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        records = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {no} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {no} is not a JSON object")
            require(row, ("epoch", *required), f"{path} line {no}")
            if not isinstance(row["epoch"], int) or isinstance(row["epoch"], bool):
                raise InputError(
                    f"{path} line {no}: epoch must be an integer, got {row['epoch']!r}"
                )
            records.append(row)
        return [r for r in records if upto is None or r["epoch"] <= upto]

    def save_epoch(
        self,
        history: list[dict[str, Any]],
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        state: Mapping[str, Any],
    ) -> None:
        """Write the history, the weights (in the model's key order, recorded for analyze) and
        the state of a finished epoch, atomically and without being split by an interrupt."""
        from htsr_cli.io.checkpoint import save_safetensors

        with held_interrupts():
            with open_output(self.file(HISTORY)) as fh:
                fh.writelines(_line(r) + "\n" for r in history)
            save_safetensors(tensors, self.file(MODEL), metadata)
            with open_output(self.file(STATE), "wb") as fh:
                import torch

                torch.save(dict(state), fh)

    # -- summary ------------------------------------------------------------------------------

    def write_final(self, doc: Mapping[str, Any]) -> None:
        write_json({**doc, "schema": RUN_SCHEMA}, self.file(FINAL))

    def read_final(self, *, required: bool = True) -> dict[str, Any] | None:
        """``final.json`` (``htsr.run/1``); None when absent and not ``required``."""
        path = self.file(FINAL)
        if not path.exists():
            if required:
                raise InputError(f"{self.path}: no {FINAL} (not a finished htsr finetune run?)")
            return None
        doc, label = read_json(path)
        check_schema(doc, RUN_SCHEMA, label)
        return doc

    def drop_final(self) -> None:
        """A finished run being extended is unfinished again."""
        with contextlib.suppress(FileNotFoundError):
            self.file(FINAL).unlink()


__all__ = [
    "ARGS",
    "ARGS_SCHEMA",
    "FINAL",
    "HISTORY",
    "MODEL",
    "PRUNE_META",
    "RUN_META",
    "RUN_SCHEMA",
    "STATE",
    "RunDir",
    "held_interrupts",
]
