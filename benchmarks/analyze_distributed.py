"""Time ``htsr analyze`` on one checkpoint in 1 process and in N processes (torchrun).

Runs, each as a separate process tree timed from here (start-up, imports, rendezvous and file
reading included), ``--repeat`` times round-robin, median reported:

1. one process, ``--jobs 1``, one BLAS thread (the plain serial run);
2. one process, ``--jobs N``: N layers at once, one BLAS thread each (on N cores);
3. ``--nproc-per-node N``: N processes through torchrun, one BLAS thread each (CPU), or one
   process per GPU with ``--device cuda``.

For each: wall time, and the peak RSS of every process of the run (``VmHWM`` sampled every
20 ms from ``/proc``; the rank is read from the process's ``RANK``). The ratio line compares
N processes with ``--jobs N`` (on a CPU machine the target is <= 1.15: the split across
processes costs no more than threads in one) and gives both speed-ups over the serial run;
the reports of all runs must be identical (checked). Checkpoint: the GPT-2-medium-shaped one of
``analyze_vs_weightwatcher.py`` (same writer, reused from ``--workdir``).

    python benchmarks/analyze_distributed.py --blocks 8            # ~2 min on 2 cores
    python benchmarks/analyze_distributed.py --nproc 8 --device cuda --blocks 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from analyze_vs_weightwatcher import build_checkpoint, busy_seconds, wait_idle  # noqa: E402


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    rank = env.get(b"RANK")
    return rank.decode() if rank is not None else None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(k) for k in fh.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def run_tree(argv: list[str], env: dict[str, str]) -> tuple[float, dict[str, int], int]:
    """Run ``argv``; returns (wall seconds, {rank or 'main': peak RSS KiB}, exit status)."""
    peaks: dict[int, int] = {}
    ranks: dict[int, str] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                hwm = _status_kib(pid, "VmHWM")
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
                if pid not in ranks:
                    r = _rank(pid)
                    if r is not None:
                        ranks[pid] = r
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    code = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    by_rank: dict[str, int] = {}
    for pid, kib in peaks.items():
        name = f"rank {ranks[pid]}" if pid in ranks else ("main" if pid == proc.pid else None)
        if name is not None:
            by_rank[name] = max(by_rank.get(name, 0), kib)
    return wall, by_rank, code


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="GPT-2-medium blocks (4 matrices)")
    ap.add_argument("--nproc", type=int, default=2, help="processes (and --jobs) to compare")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--metrics", default=None, help="--metrics for htsr (default: all ten)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS")
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="htsr-dist-bench-")
    os.makedirs(workdir, exist_ok=True)
    ckpt, reused = build_checkpoint(workdir, args.blocks, args.seed)
    n = args.nproc
    print(
        f"checkpoint: {ckpt} ({args.blocks} GPT-2-medium blocks, {4 * args.blocks} "
        f"matrices{', reused' if reused else ''}); nproc {n}; device {args.device}; "
        f"{os.cpu_count()} CPUs"
    )
    base = [sys.executable, "-m", "htsr_cli", "analyze", ckpt, "--format", "json",
            "--no-progress", "--device", args.device]  # fmt: skip
    if args.metrics:
        base += ["--metrics", args.metrics]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = {
        "1 process, --jobs 1": [*base, "--jobs", "1"],
        f"1 process, --jobs {n}": [*base, "--jobs", str(n)],
        f"{n} processes (--nproc-per-node {n})": [*base, "--nproc-per-node", str(n)],
    }
    if args.device != "cpu":  # one process per GPU vs one process on one GPU
        runs = {k: v for k, v in runs.items() if "--jobs 1" in v or "--nproc-per-node" in v}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, dict[str, int]] = {k: {} for k in runs}
    reports: dict[str, Any] = {}
    for i in range(args.repeat):
        for label, cmd in runs.items():
            wait_idle(args.wait_idle)
            out = os.path.join(workdir, f"report-{len(reports)}.json")
            b0 = busy_seconds()
            wall, rss, code = run_tree([*cmd, "-o", out], env)
            b1 = busy_seconds()
            if code != 0:
                sys.exit(f"{label}: exit status {code}")
            times[label].append(wall)
            for k, v in rss.items():
                peaks[label][k] = max(peaks[label].get(k, 0), v)
            with open(out) as fh:
                reports[label] = json.load(fh)
            os.unlink(out)
            busy = "" if b0 is None or b1 is None else f", machine busy {(b1 - b0) / wall:.2f} CPUs"
            print(f"  [run {i + 1}/{args.repeat}] {label}: {wall:.1f} s{busy}", file=sys.stderr)
    first = next(iter(reports.values()))
    same = all(r["layers"] == first["layers"] for r in reports.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    for label in runs:
        mem = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in sorted(peaks[label].items()))
        runs_s = ", ".join(f"{t:.1f}" for t in times[label])
        print(f"{label:<36} {med[label]:7.1f} s  (runs: {runs_s})  peak RSS: {mem}")
    many = med[f"{n} processes (--nproc-per-node {n})"]
    serial = med["1 process, --jobs 1"]
    if args.device == "cpu":
        threads = med[f"1 process, --jobs {n}"]
        verdict = "ok" if many <= 1.15 * threads else "MISSED"
        print(f"ratio {n} processes / --jobs {n}: {many / threads:.2f} (target <= 1.15: "
              f"{verdict}); speed-up over --jobs 1: {serial / many:.2f}x with {n} processes, "
              f"{serial / threads:.2f}x with --jobs {n}")  # fmt: skip
    else:
        print(f"speed-up of {n} processes over 1: {serial / many:.2f}x (linear: {n}x)")
    print(f"reports identical (every layer, every run): {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
