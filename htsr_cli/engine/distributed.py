"""Scale-out analysis over torch.distributed: one checkpoint's layers split across processes.

Under torchrun (``WORLD_SIZE`` > 1) every rank opens the checkpoint (headers only), the ranks
agree that they see the same files and options (:func:`fingerprint`), the layers are split by
estimated cost (:func:`layer_cost`, :func:`assign`), each rank reads and analyses only its own
tensors, and rank 0 gathers the rows. A failure on any rank stops every rank; rank 0 reports
it in one line and every rank exits non-zero (docs/distributed.md).

Rows travel through a gloo process group (a few KB per layer, so gloo even on CUDA); the
progress count and the "a peer failed" flag travel through the rendezvous key-value store.

:func:`torchrun` is the one launcher behind ``--nproc-per-node`` (analyze and finetune):
torchrun's agent in this process, without its log lines and traceback. ``python -m
htsr_cli.engine.distributed ARGS`` is the same for any torchrun command line (two nodes...).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from htsr_cli.engine import spectrum
from htsr_cli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    HtsrError,
    InputError,
    one_line,
    report_interrupt,
)
from htsr_cli.io.terminal import printable

#: Eigen-solve cost per ``M**3`` of one slice, in units of the Gram's cost per ``N*M**2``:
#: LAPACK's ``eigvalsh`` of a 1024x1024 Gram took 0.070 CPU-s (65 ps per M**3) and the
#: 4096x1024 Gram product 0.097 CPU-s (23 ps per N*M**2) on this project's CPU, one thread.
EIG_COST_PER_M3 = 3.0
#: How long ranks other than 0 wait for rank 0 to report a failure before exiting themselves.
REPORT_WAIT_S = 60.0
#: Collective timeout of the process group htsr creates: a rank may wait for a slower one
#: for as long as the slowest share takes (a dead rank is torchrun's to notice).
GROUP_TIMEOUT = timedelta(hours=24)
#: Seconds between two progress polls of rank 0.
POLL_S = 0.2
#: Set by the launcher (:func:`torchrun`, ``python -m htsr_cli.engine.distributed``) for its
#: workers: a directory where each rank keeps the name of the first layer of its share it has
#: not finished (file ``rank-N``), so that the launcher can name the layer of a rank killed
#: by a signal, which cannot report anything itself.
RANK_STATE_ENV = "HTSR_RANK_STATE"


def dist_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment; (1, 0, 0) without it."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def should_shard(shard: bool | None = None) -> bool:
    """Whether an analysis here is split across torchrun's ranks: ``shard`` when given (every
    rank must then call it), else when ``WORLD_SIZE`` > 1 and no process group exists yet.
    A program that set up its own group (DDP training that analyses on rank 0 alone, such as
    ``htsr finetune``'s re-allocation) gets a local analysis unless it asks."""
    if dist_env()[0] <= 1 or shard is False:
        return False
    if shard:
        return True
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


# ---------------------------------------------------------------------------------------------
# Splitting the layers


def layer_cost(shape: Sequence[int], *, rand_distance: bool = True) -> float:
    """Estimated flops of one layer: per slice the Gram (``N*M**2``) and the eigen-solve
    (``EIG_COST_PER_M3 * M**3``), twice with ``rand_distance`` (the shuffled copy); 0 for
    a weight that is not a layer (it is skipped from its metadata, nothing is computed)."""
    geom = spectrum.geometry(tuple(shape))
    if geom is None:
        return 0.0
    one = geom.rf * (geom.N * geom.M**2 + EIG_COST_PER_M3 * geom.M**3)
    return float(one * (2 if rand_distance else 1))


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each layer: the most expensive layer first, each to the least loaded rank
    (ties to the lowest rank): the longest-processing-time rule, within 4/3 of the best split.
    Deterministic, so every rank computes the same split without talking."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def fingerprint(files: Sequence[str], refs: Sequence[Any], options: dict[str, Any]) -> str:
    """sha256 of what a rank is about to analyse: the input files' names and sizes (the
    index file's bytes too), every tensor's key, shape and dtype, and the options. Cheap (no
    tensor data is read); equal on every rank that sees the same checkpoint."""
    h = hashlib.sha256()
    entries = []
    for path in files:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        entries.append([os.path.basename(path), size])
        if path.endswith(".json"):
            try:
                with open(path, "rb") as fh:
                    h.update(fh.read())
            except OSError:
                pass
    desc = {
        "files": entries,
        "tensors": [[r.key, list(r.shape), r.dtype] for r in refs],
        "options": options,
    }
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Failures


class RankFailed(HtsrError):
    """A rank of a sharded run failed; raised on rank 0, whose one line names the rank (and
    the layer). ``exit_code`` is the failure's (2 for bad input, 3 for a bug)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerFailed(SystemExit):
    """Raised on ranks other than 0 when a sharded run failed: they exit with the failure's
    status and print nothing (rank 0 prints the one line)."""


class PeerDone(SystemExit):
    """Raised (status 0) on ranks other than 0 once their share of a sharded on-the-fly
    analysis (allocate, prune) is gathered: rank 0 alone plans and writes."""


@dataclass
class Failure:
    """One rank's failure, as sent to the others."""

    rank: int
    layer: str | None
    message: str
    exit_code: int
    order: int  # the failures' arrival order (the first one is reported)

    def line(self) -> str:
        where = f"rank {self.rank}" + (f", layer {self.layer}" if self.layer else "")
        return f"{where}: {self.message}"


def describe(exc: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` of an exception raised by a rank."""
    if isinstance(exc, HtsrError):
        return str(exc), exc.exit_code
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return (
            f"out of memory ({one_line(exc) or type(exc).__name__}); use fewer --jobs or "
            "more processes",
            EXIT_USAGE,
        )
    return f"internal error: {type(exc).__name__}: {one_line(exc)} (a bug)", EXIT_INTERNAL


_LAYER_ATTR = "htsr_layer"


def mark_layer(exc: BaseException, name: str) -> None:
    """Remember on ``exc`` which layer it came from (first mark wins)."""
    if getattr(exc, _LAYER_ATTR, None) is None:
        try:
            setattr(exc, _LAYER_ATTR, name)
        except AttributeError:  # an exception type with __slots__: the rank alone is named
            pass


class Stopped(Exception):
    """A peer failed: this rank stops its walk and reports nothing of its own."""


# ---------------------------------------------------------------------------------------------
# The group


class Group:
    """This process's part in one sharded analysis; ``world == 1`` is a plain local run where
    every method is a no-op. Use as a context manager around the analysis."""

    def __init__(self, world: int, rank: int, local_rank: int) -> None:
        if world > 1 and not 0 <= rank < world:
            raise InputError(f"RANK {rank} is not below WORLD_SIZE {world}")
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self._own_group = False
        self._store: Any = None
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._stop_poll = threading.Event()
        self._old_sigterm: Any = None
        self._failed = False  # a failure was raised: rank 0's exit must release the peers
        self._share: list[str] = []  # this rank's layers, in walk order
        self._done_in_share = 0

    @classmethod
    def from_env(cls, shard: bool | None = None) -> Group:
        """This process's group: torchrun's when :func:`should_shard`, else a local one."""
        return cls(*dist_env()) if should_shard(shard) else cls(1, 0, 0)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def __enter__(self) -> Group:
        if self.sharded:
            self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_poll.set()
        if self._poller is not None:
            self._poller.join()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        import torch.distributed as dist

        # Torn down here (gloo's threads abort a process that exits with them running),
        # except on rank 0 after a reported failure: outside torchrun it hosts the store,
        # which must live until its exit has told the peers it reported (_announce_exit).
        if self._own_group and dist.is_initialized() and not (self._failed and self.rank == 0):
            dist.destroy_process_group()

    def _start(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
            self._own_group = True
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise InputError("the process group does not match WORLD_SIZE/RANK")
        # A fresh key prefix per analysis: torchrun's store outlives restarts and analyses.
        box = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=60))
            self._store = dist.PrefixStore(f"htsr/{box[0]}/", store)
        if self.rank == 0:
            atexit.register(self._announce_exit)
            if threading.current_thread() is threading.main_thread():
                # torchrun stops the other ranks with SIGTERM when one dies: unwind (no
                # half-written output) and let the launcher name the dead rank.
                self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm)

    # -- the key-value store (progress, failure flag, exit) ---------------------------------

    def _add(self, key: str, n: int) -> int:
        if self._store is None:
            return 0
        with self._lock:
            return int(self._store.add(key, n))

    def _set(self, key: str, value: str) -> None:
        if self._store is not None:
            with self._lock:
                self._store.set(key, value)

    def _announce_exit(self) -> None:
        """Rank 0 at exit: tell the peers it has reported, wait (briefly) until they have
        heard it, then tear down the group it kept alive after a failure (gloo's threads
        abort the process when left running at exit)."""
        if not self._failed:
            return  # a finished run: nobody waits, the group is gone already
        try:
            self._set("exited", "1")
            deadline = time.monotonic() + 10.0
            while self._add("left", 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception:  # the store may be gone already: the peers time out instead
            pass
        import torch.distributed as dist

        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()

    def stopping(self) -> bool:
        """Whether a peer has failed (checked before each layer)."""
        return self.sharded and self._add("failures", 0) > 0

    def failed(self) -> int:
        """Record that this rank failed; returns the failure's arrival order."""
        return self._add("failures", 1) if self.sharded else 1

    def begin_share(self, names: Sequence[str]) -> None:
        """Record this rank's layers (in walk order) before walking them: where it stands is
        then known outside it (the launcher's state file, :meth:`unfinished`) should it be
        killed."""
        if self.sharded:
            self._share, self._done_in_share = list(names), 0
            self._record_position()

    def layer_done(self, name: str) -> None:
        if self.sharded:
            self._set("last", name)
            self._add("done", 1)
            self._done_in_share += 1
            self._record_position()

    def _record_position(self) -> None:
        """Publish the first layer of this rank's share not finished yet ("" once all are):
        in the store for rank 0 and, under :func:`torchrun`, in a file for the launcher."""
        i = self._done_in_share
        at = self._share[i] if i < len(self._share) else ""
        self._set(f"at/{self.rank}", at)
        folder = os.environ.get(RANK_STATE_ENV)
        if folder:
            with contextlib.suppress(OSError):  # only ever a better error message
                with open(os.path.join(folder, f"rank-{self.rank}"), "w") as fh:
                    fh.write(at)

    def unfinished(self) -> dict[int, str]:
        """The other ranks that have not finished their share: rank -> the layer it was on
        (read from the store, which outlives a killed rank)."""
        if self._store is None:
            return {}
        out: dict[int, str] = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            key = f"at/{r}"
            try:
                with self._lock:
                    at = (
                        self._store.get(key).decode(errors="replace")
                        if self._store.check([key])
                        else ""
                    )
            except Exception:  # the store is gone too: say nothing more
                return out
            if at:
                out[r] = at
        return out

    @contextlib.contextmanager
    def progress(
        self, total: int, on_progress: Callable[[int, int, str], None] | None
    ) -> Iterator[Callable[[int, int, str], None] | None]:
        """The ``on_progress`` of this rank's walk: the callback itself in a local run; in a
        sharded run rank 0 polls every rank's count instead (one display), others show none."""
        if not self.sharded:
            yield on_progress
            return
        if self.rank != 0 or on_progress is None or self._store is None:
            yield None
            return

        def poll() -> None:
            shown = -1
            while not self._stop_poll.wait(POLL_S):
                done = self._add("done", 0)
                if done != shown and done > 0:
                    shown = done
                    with self._lock:
                        last = self._store.get("last").decode(errors="replace")
                    on_progress(done, total, last)

        self._stop_poll.clear()
        self._poller = threading.Thread(target=poll, name="htsr-progress", daemon=True)
        self._poller.start()
        try:
            yield None
        finally:
            self._stop_poll.set()
            self._poller.join()
            self._poller = None

    # -- collectives ------------------------------------------------------------------------

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order (on every rank)."""
        if not self.sharded:
            return [payload]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with self._peer_lost():
            dist.all_gather_object(out, payload)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.sharded:
            return obj
        import torch.distributed as dist

        box = [obj]
        with self._peer_lost():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _peer_lost(self) -> Iterator[None]:
        """A collective that fails because a peer went away (killed, out of memory) stops this
        rank as an interrupt would (exit 130, nothing written), with one line saying why and,
        from the store, which ranks had not finished and the layer each was on."""
        try:
            yield
        except RuntimeError:  # DistBackendError: gloo's "Connection reset by peer", ...
            report_interrupt(silent=True)  # this line says it all: no "htsr: interrupted"
            where = "; ".join(f"rank {r} at layer {at}" for r, at in self.unfinished().items())
            raise RankFailed(
                "lost contact with another rank (killed or out of memory?)"
                + (f"; unfinished: {where}" if where else "")
                + "; nothing written",
                EXIT_INTERRUPTED,
            ) from None

    def raise_failure(self, failures: Sequence[Failure]) -> None:
        """Stop every rank on the first failure: rank 0 raises it (its one line), the others
        wait until rank 0 has reported and exited, then exit with the same status."""
        first = min(failures, key=lambda f: (f.order, f.rank))
        self._failed = True
        if self.rank == 0:
            raise RankFailed(first.line(), first.exit_code)
        if self._store is not None:
            try:
                with self._lock:
                    self._store.wait(["exited"], timedelta(seconds=REPORT_WAIT_S))
                self._add("left", 1)
            except Exception:  # rank 0 took too long or is gone: exit anyway
                pass
        raise PeerFailed(first.exit_code)


def _sigterm(signum: int, frame: Any) -> None:
    report_interrupt(silent=True)  # the launcher (torchrun) names the rank that died
    raise KeyboardInterrupt


def agree(group: Group, step: Callable[[], Any], identity: Callable[[Any], str]) -> Any:
    """Run ``step`` on every rank and check that all succeeded and that ``identity`` of their
    results is rank 0's; raise the first failure everywhere otherwise (one line, naming the
    rank). In a local run ``step()`` is returned as is (its errors unchanged)."""
    if not group.sharded:
        return step()
    result, payload = None, None
    try:
        result = step()
        payload = ("ok", identity(result))
    except Exception as exc:
        message, code = describe(exc)
        payload = ("failed", message, code)
    got = group.exchange(payload)
    failures = [Failure(r, None, p[1], p[2], 0) for r, p in enumerate(got) if p[0] == "failed"]
    if not failures:
        ref = got[0][1]
        failures = [
            Failure(
                r,
                None,
                f"sees a different checkpoint or options than rank 0 (sha256 of the file "
                f"list and options {p[1][:12]}... vs {ref[:12]}...); every rank must read "
                "the same files with the same options",
                EXIT_USAGE,
                0,
            )
            for r, p in enumerate(got)
            if p[1] != ref
        ]
    if failures:
        if result is not None and hasattr(result, "close"):
            result.close()
        group.raise_failure(failures)
    return result


# ---------------------------------------------------------------------------------------------
# Launching


def check_shard_device(device: str) -> None:
    """A sharded run puts each process on the GPU of its ``LOCAL_RANK``: ``--device cuda:N``,
    one GPU for all of them, is refused (before launching, and on every rank under torchrun)."""
    if device.startswith("cuda:"):
        raise InputError(
            f"--device {device} names one GPU, but each process of a sharded run uses the GPU "
            "of its LOCAL_RANK: use --device cuda"
        )


def check_nproc(nproc: int, device: str) -> None:
    """``--nproc-per-node`` must be positive, not nested in torchrun, and at most the GPUs
    present when the analysis runs on CUDA (``auto`` with CUDA present, ``cuda``)."""
    if nproc < 1:
        raise InputError(f"--nproc-per-node must be a positive integer, got {nproc}")
    if "TORCHELASTIC_RUN_ID" in os.environ or dist_env()[0] > 1:
        raise InputError("--nproc-per-node: already running under torchrun")
    check_shard_device(device)
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        n = torch.cuda.device_count()
        if nproc > n:
            raise InputError(
                f"--nproc-per-node {nproc} is more than the {n} GPU(s) present "
                "(one process per GPU; use --device cpu for CPU processes)"
            )


def torchrun(worker_argv: Sequence[str], nproc: int, *, threads: int | None = None) -> int:
    """Run ``htsr WORKER_ARGV`` in ``nproc`` processes on this machine through
    ``torch.distributed.run --standalone`` and return the exit status: the first failed
    rank's (its own one-line error already printed), ``128 + signal`` for a rank killed by
    a signal (one line naming it here). ``threads`` sets ``OMP_NUM_THREADS`` for each worker
    unless the caller's environment sets it (default: the cores divided between them).

    torchrun's agent runs in this process (which has imported torch already: one start-up
    fewer than a ``python -m torch.distributed.run`` child), its log lines silenced."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        threads = max(1, cores // nproc)
    saved = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # N processes share the cores
    try:
        return _run_torchrun(
            ["--standalone", f"--nproc-per-node={nproc}", "-m", "htsr_cli", *worker_argv]
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run_torchrun(argv: list[str]) -> int:
    """``torch.distributed.run`` with its log lines silenced and its ChildFailedError turned
    into an exit status (the workers print their own one-line errors). A rank killed by a
    signal is named here, with the layer it was on (:data:`RANK_STATE_ENV`)."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # elastic's loggers read it at import
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="htsr-ranks-") as state:
        saved = os.environ.get(RANK_STATE_ENV)
        os.environ[RANK_STATE_ENV] = state  # the workers inherit the agent's environment
        try:
            run(get_args_parser().parse_args(argv))
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode
            if code >= 0:
                return code
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            sys.stderr.write(
                f"htsr: error: rank {rank} was killed by {signame}{_killed_at(state, rank)} "
                "(out of memory?); the other ranks were stopped\n"
            )
            return 128 - code
        except KeyboardInterrupt:
            return 130
        finally:
            if saved is None:
                os.environ.pop(RANK_STATE_ENV, None)
            else:
                os.environ[RANK_STATE_ENV] = saved
    return 0


def _killed_at(state: str, rank: int) -> str:
    """`` at layer NAME`` for a killed rank that had begun its share, else ""."""
    try:
        with open(os.path.join(state, f"rank-{rank}")) as fh:
            at = fh.read()
    except OSError:  # killed before its share began (or not an analysis)
        return ""
    return f" at layer {printable(at)}" if at else ""


__all__ = [
    "EIG_COST_PER_M3",
    "Failure",
    "Group",
    "PeerDone",
    "PeerFailed",
    "RankFailed",
    "Stopped",
    "agree",
    "assign",
    "check_nproc",
    "check_shard_device",
    "describe",
    "dist_env",
    "fingerprint",
    "layer_cost",
    "mark_layer",
    "should_shard",
    "torchrun",
]

if __name__ == "__main__":
    sys.exit(_run_torchrun(sys.argv[1:]))
