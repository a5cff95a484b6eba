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


#: Llama-2-7B's matrices (d_model 4096, d_ff 11008), nn.Linear layout; 32 blocks = 224.
LLAMA2_7B = (
    ("self_attn.q_proj", (4096, 4096)),
    ("self_attn.k_proj", (4096, 4096)),
    ("self_attn.v_proj", (4096, 4096)),
    ("self_attn.o_proj", (4096, 4096)),
    ("mlp.gate_proj", (11008, 4096)),
    ("mlp.up_proj", (11008, 4096)),
    ("mlp.down_proj", (4096, 11008)),
)

#: The eigen-solve bound on a device: read each matrix, float64 Gram on its smaller side,
#: eigvalsh; nothing else (argv: checkpoint, device).
_BOUND = r"""
import sys, torch
from safetensors import safe_open
dev = torch.device(sys.argv[2])
with safe_open(sys.argv[1], framework="pt") as f:
    for k in f.keys():
        w = f.get_tensor(k).to(dev, torch.float64)
        g = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
        torch.linalg.eigvalsh(g)
if dev.type == "cuda":
    torch.cuda.synchronize()
"""
BOUND = "eigen-solve bound (torch float64)"


def build_llama(workdir: str, blocks: int) -> str:
    """A Llama-2-7B-shaped bf16 checkpoint (N(0, 0.02) entries), written one tensor at a time
    by htsr's own safetensors writer; reused when present."""
    import torch

    from htsr_cli.io.checkpoint import write_safetensors

    path = os.path.join(workdir, f"llama2-7b-shaped-{blocks}blocks-bf16.safetensors")
    if os.path.exists(path):
        return path
    layout = [
        (f"model.layers.{i}.{name}.weight", torch.bfloat16, shape)
        for i in range(blocks)
        for name, shape in LLAMA2_7B
    ]
    gen = torch.Generator().manual_seed(0)

    def tensors() -> Any:
        for key, dtype, shape in layout:
            yield key, (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    write_safetensors(path, tensors(), layout, {"generator": "benchmarks/analyze_distributed.py"})
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="blocks of the model shape")
    ap.add_argument("--nproc", type=int, default=2, help="processes (and --jobs) to compare")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--metrics", default=None, help="--metrics for htsr (default: all ten)")
    ap.add_argument("--jobs", type=int, default=None, help="--jobs of the GPU runs")
    ap.add_argument(
        "--shape",
        choices=("gpt2-medium", "llama2-7b"),
        default="gpt2-medium",
        help="gpt2-medium: float32, 4 matrices a block (analyze_vs_weightwatcher.py's file); "
        "llama2-7b: bf16, 7 a block (32 blocks = Llama-2-7B's 224 matrices, 13 GB)",
    )
    ap.add_argument("--bound", action="store_true", help=f"also time the {BOUND} on --device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS")
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="htsr-dist-bench-")
    os.makedirs(workdir, exist_ok=True)
    if args.shape == "llama2-7b":
        ckpt, reused = build_llama(workdir, args.blocks), False
    else:
        ckpt, reused = build_checkpoint(workdir, args.blocks, args.seed)
    n = args.nproc
    print(
        f"checkpoint: {ckpt} ({args.blocks} {args.shape} blocks{', reused' if reused else ''});"
        f" nproc {n}; device {args.device}; {os.cpu_count()} CPUs"
    )
    base = [sys.executable, "-m", "htsr_cli", "analyze", ckpt, "--format", "json",
            "--no-progress", "--device", args.device]  # fmt: skip
    if args.metrics:
        base += ["--metrics", args.metrics]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs: dict[str, list[str]] = {}
    if args.bound:
        runs[BOUND] = [sys.executable, "-c", _BOUND, ckpt, args.device]
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one BLAS thread per process or per --jobs worker
        runs["1 process, --jobs 1"] = [*base, "--jobs", "1"]
        if n > 1:
            runs[f"1 process, --jobs {n}"] = [*base, "--jobs", str(n)]
    else:  # one process on one GPU vs one process per GPU
        jobs = [] if args.jobs is None else ["--jobs", str(args.jobs)]
        base += jobs
        runs[f"1 process{' ' + ' '.join(jobs) if jobs else ''}"] = base
    if n > 1:
        runs[f"{n} processes (--nproc-per-node {n})"] = [*base, "--nproc-per-node", str(n)]
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, dict[str, int]] = {k: {} for k in runs}
    reports: dict[str, Any] = {}
    for i in range(args.repeat):
        for label, cmd in runs.items():
            wait_idle(args.wait_idle)
            out = os.path.join(workdir, "report.json")
            analysis = label != BOUND
            b0 = busy_seconds()
            wall, rss, code = run_tree([*cmd, "-o", out] if analysis else cmd, env)
            b1 = busy_seconds()
            if code != 0:
                sys.exit(f"{label}: exit status {code}")
            times[label].append(wall)
            for k, v in rss.items():
                peaks[label][k] = max(peaks[label].get(k, 0), v)
            if analysis:
                with open(out) as fh:
                    reports[label] = json.load(fh)
                os.unlink(out)
            busy = "" if b0 is None or b1 is None else f", machine busy {(b1 - b0) / wall:.2f} CPUs"
            print(f"  [run {i + 1}/{args.repeat}] {label}: {wall:.1f} s{busy}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    for label in runs:
        mem = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in sorted(peaks[label].items()))
        runs_s = ", ".join(f"{t:.1f}" for t in times[label])
        ratio = f"  {med[label] / med[BOUND]:.2f}x the bound" if BOUND in med else ""
        print(f"{label:<38} {med[label]:7.1f} s{ratio}  (runs: {runs_s})  peak RSS: {mem}")
    labels = [k for k in runs if k != BOUND]
    serial = med[labels[0]]
    if n > 1:
        many = med[labels[-1]]
        if args.device == "cpu":
            threads = med[labels[1]]
            verdict = "ok" if many <= 1.15 * threads else "MISSED"
            print(
                f"ratio {n} processes / --jobs {n}: {many / threads:.2f} (target <= 1.15: "
                f"{verdict}); speed-up over --jobs 1: {serial / many:.2f}x with {n} processes, "
                f"{serial / threads:.2f}x with --jobs {n}"
            )
        else:
            print(f"speed-up of {n} processes over 1: {serial / many:.2f}x (linear: {n}x)")
    first = next(iter(reports.values()))
    same = all(r["layers"] == first["layers"] for r in reports.values())
    print(f"reports identical (every layer, every run): {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
