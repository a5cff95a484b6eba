#!/usr/bin/env python
"""Time ``htsr analyze`` against an eigenvalue-only lower bound and WeightWatcher 0.7.7.

One run of this script:

1. writes a random GPT-2-medium-shaped checkpoint (``--blocks`` transformer blocks, float32,
   Student-t(df=4) * 0.02 entries from ``--seed``) as one ``.safetensors`` file;
2. runs every measurement as a separate process (Python start-up, imports and file reading
   included) and reports the median wall time of ``--repeat`` runs and each process's peak RSS:

   - the start-up floor: ``python -c "import torch, htsr_cli..."``, no work;
   - the lower bound: a tiny program that opens the file with ``safetensors.safe_open`` and takes
     float64 ``eigvalsh`` of the smaller Gram matrix of every matrix, nothing else (numpy and
     torch are both tried once; the faster one is the lower bound);
   - ``htsr analyze`` with alpha only, with the nine metrics other than rand_distance, and with
     all ten metrics;
   - WeightWatcher 0.7.7 ``analyze()`` (default options) on an ``nn.ModuleDict`` of
     ``nn.Linear`` built from the same file, and optionally ``analyze(randomize=True)``;

3. checks that htsr's alpha matches WeightWatcher's per layer (max relative difference);
4. with ``--memory-test``, writes a ~2 GB four-shard Hugging Face checkpoint
   (``model.safetensors.index.json``) and shows that htsr's peak RSS follows the largest
   tensor, not the checkpoint size.

Every child runs under a small wrapper (``_RUNNER``) that does the job in-process and writes its
own peak RSS (``VmHWM`` from ``/proc/self/status``; not ``ru_maxrss``, which Linux carries over
``execve`` from the parent) plus the sampled peaks of ``RssAnon``/``RssFile`` (every 20 ms) to a
side file. Generated files are deleted at the end
unless ``--keep``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MiB = 1 << 20
DF, SCALE = 4, 0.02
#: Matrices of one GPT-2-medium block (d_model 1024, d_ff 4096), stored in nn.Linear layout
#: (out_features, in_features). HF's GPT-2 Conv1D stores the transpose; the spectrum is the same.
BLOCK = (
    ("attn.c_attn", (3072, 1024)),
    ("attn.c_proj", (1024, 1024)),
    ("mlp.c_fc", (4096, 1024)),
    ("mlp.c_proj", (1024, 4096)),
)
#: Token embedding of GPT-2 (vocab 50257); used only by --memory-test as its largest tensor.
WTE = ("wte", (50257, 1024))

# --------------------------------------------------------------------------------------------
# The child-process wrapper. argv: SIDE_FILE KIND ARGS...; it writes {"maxrss_kb", "peak_anon_kb",
# "peak_file_kb", "rc", "extra"} to SIDE_FILE whatever happens.
# --------------------------------------------------------------------------------------------
_RUNNER = r"""
import json, re, resource, sys, threading, time
_side, _kind, _args = sys.argv[1], sys.argv[2], sys.argv[3:]
_peak = {"RssAnon": 0, "RssFile": 0}
_pat = re.compile(r"^(RssAnon|RssFile):\s+(\d+) kB", re.M)
def _read():
    try:
        with open("/proc/self/status") as fh:
            for k, v in _pat.findall(fh.read()):
                _peak[k] = max(_peak[k], int(v))
    except OSError:
        pass
def _sampler():
    while True:
        _read()
        time.sleep(0.02)
threading.Thread(target=_sampler, daemon=True).start()

def _natural(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

rc, extra = 0, {}
try:
    if _kind == "floor":
        import numpy, safetensors, torch  # noqa
        import htsr_cli.engine.analysis, htsr_cli.cli, htsr_cli.engine.report  # noqa
    elif _kind == "htsr":
        from htsr_cli.cli import main
        try:
            main(_args)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    elif _kind == "lower-numpy":
        import numpy as np
        from safetensors import safe_open
        n = 0
        with safe_open(_args[0], framework="np") as f:
            for key in f.keys():
                w = f.get_tensor(key)
                if w.ndim != 2:
                    continue
                w = w.astype(np.float64)
                g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
                del w
                np.linalg.eigvalsh(g)
                n += 1
        extra["matrices"] = n
    elif _kind == "parallel-numpy":
        # The same work, as many matrices at once as there are cores, one BLAS thread each
        # (what htsr does on the CPU): the best this machine can do, for reference only.
        import collections, os
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np
        from safetensors import safe_open
        from threadpoolctl import threadpool_limits
        def _solve(w):
            w = w.astype(np.float64)
            g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            del w
            np.linalg.eigvalsh(g)
        workers = len(os.sched_getaffinity(0))
        n, window = 0, collections.deque()
        with safe_open(_args[0], framework="np") as f, threadpool_limits(1, "blas"), \
                ThreadPoolExecutor(workers) as pool:
            for key in f.keys():
                w = f.get_tensor(key)
                if w.ndim != 2:
                    continue
                window.append(pool.submit(_solve, w))
                n += 1
                while len(window) > workers:
                    window.popleft().result()
            for fut in window:
                fut.result()
        extra["matrices"] = n
    elif _kind == "lower-torch":
        import torch
        from safetensors import safe_open
        dev = torch.device(_args[1])
        n = 0
        with safe_open(_args[0], framework="pt") as f:
            for key in f.keys():
                w = f.get_tensor(key)
                if w.ndim != 2:
                    continue
                w = w.to(dev, torch.float64)
                g = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
                del w
                torch.linalg.eigvalsh(g)
                n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        extra["matrices"] = n
    elif _kind == "ww":
        import logging
        import torch
        import weightwatcher
        from safetensors import safe_open
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        model = torch.nn.ModuleDict()
        with safe_open(_args[0], framework="pt") as f:
            for key in sorted(f.keys(), key=_natural):
                w = f.get_tensor(key)
                if not key.endswith(".weight") or w.ndim != 2:
                    continue
                lin = torch.nn.utils.skip_init(torch.nn.Linear, w.shape[1], w.shape[0],
                                               bias=False)
                lin.weight = torch.nn.Parameter(w, requires_grad=False)
                model[key[:-len(".weight")].replace(".", "__")] = lin
        t0 = time.perf_counter()
        details = weightwatcher.WeightWatcher(model=model).analyze(
            randomize=_args[1] == "randomize")
        extra["analyze_s"] = time.perf_counter() - t0
        extra["alpha"] = {str(n).replace("__", "."): float(a)
                          for n, a in zip(details["name"], details["alpha"])}
    else:
        raise SystemExit(f"unknown job kind {_kind}")
except BaseException as exc:
    import traceback
    traceback.print_exc()
    rc = rc or 99
finally:
    _read()
    with open(_side, "w") as fh:
        _ru = resource.getrusage(resource.RUSAGE_SELF)
        # Peak RSS: VmHWM of this process's own address space. ru_maxrss is NOT used: Linux
        # keeps it across execve, so a child reports at least its parent's RSS at the fork.
        try:
            with open("/proc/self/status") as _st:
                _hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", _st.read(), re.M).group(1))
        except (OSError, AttributeError):
            _hwm = _ru.ru_maxrss
        json.dump({"maxrss_kb": _hwm, "cpu_s": _ru.ru_utime + _ru.ru_stime,
                   "sys_s": _ru.ru_stime, "majflt": _ru.ru_majflt,
                   "peak_anon_kb": _peak["RssAnon"], "peak_file_kb": _peak["RssFile"],
                   "rc": rc, "extra": extra}, fh)
"""


@dataclass
class Job:
    """One measured command: a job kind of ``_RUNNER`` and its arguments."""

    label: str
    kind: str
    args: list[str]


@dataclass
class Measurement:
    label: str
    seconds: float  # median wall time over the runs
    maxrss_mib: float  # max over the runs of the child's VmHWM (peak RSS)
    anon_mib: float  # max over the runs of the sampled RssAnon peak
    file_mib: float  # max over the runs of the sampled RssFile peak
    cpu_s: float  # median user+sys CPU seconds
    times: list[float] = field(default_factory=list)
    contended: list[bool] = field(default_factory=list)  # per run: other processes were busy
    extra: dict[str, Any] = field(default_factory=dict)

    def rss_text(self) -> str:
        return (
            f"peak RSS {self.maxrss_mib:5.0f} MiB (anon {self.anon_mib:4.0f}, "
            f"file-backed {self.file_mib:4.0f})"
        )


def log(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Checkpoint writing: a streaming safetensors writer (one tensor in memory at a time).
# --------------------------------------------------------------------------------------------


def _header(tensors: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    head: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, shape in tensors:
        nbytes = 4 * math.prod(shape)
        head[key] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str,
    tensors: list[tuple[str, tuple[int, ...]]],
    rng: np.random.Generator,
    metadata: dict[str, str],
) -> int:
    """Write Student-t(df=4)*0.02 float32 tensors in the given order; returns the file size."""
    tmp = path + ".partial"
    with open(tmp, "wb") as fh:
        fh.write(_header(tensors, metadata))
        for _, shape in tensors:
            arr = (rng.standard_t(DF, size=shape) * SCALE).astype(np.float32)
            fh.write(memoryview(arr).cast("B"))
            del arr
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_metadata(path: str) -> dict[str, str] | None:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n)).get("__metadata__")
    except (OSError, ValueError, struct.error):
        return None


def block_tensors(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"h.{i}.{name}.weight", shape) for i in range(blocks) for name, shape in BLOCK]


def build_checkpoint(workdir: str, blocks: int, seed: int) -> tuple[str, bool]:
    """The main benchmark checkpoint; reused when a matching one is already in workdir."""
    path = os.path.join(workdir, f"gpt2-medium-shaped-{blocks}blocks-seed{seed}.safetensors")
    meta = {
        "format": "pt",
        "generator": "benchmarks/analyze_vs_weightwatcher.py",
        "blocks": str(blocks),
        "seed": str(seed),
        "dist": f"student_t(df={DF})*{SCALE}",
    }
    if read_metadata(path) == meta:
        return path, True
    write_safetensors(path, block_tensors(blocks), np.random.default_rng(seed), meta)
    return path, False


def build_sharded(directory: str, total_gb: float, shards: int, seed: int) -> tuple[int, int]:
    """A Hugging Face sharded layout of ~total_gb GB: wte + as many blocks as fit, packed into
    ``shards`` files of about equal size. Returns (total bytes, largest tensor bytes)."""
    os.makedirs(directory, exist_ok=True)
    block_bytes = 4 * sum(math.prod(s) for _, s in BLOCK)
    wte_bytes = 4 * math.prod(WTE[1])
    n_blocks = max(1, round((total_gb * 1e9 - wte_bytes) / block_bytes))
    tensors = [(f"{WTE[0]}.weight", WTE[1])] + block_tensors(n_blocks)
    target = (wte_bytes + n_blocks * block_bytes) / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = 4 * math.prod(t[1])
        if groups[-1] and size + nbytes > target * 1.02 and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    rng = np.random.default_rng(seed + 1)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), group, rng, {"format": "pt"})
        weight_map.update({key: name for key, _ in group})
        total += 4 * sum(math.prod(s) for _, s in group)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total, max(4 * math.prod(s) for _, s in tensors)


# --------------------------------------------------------------------------------------------
# Running and measuring one child process.
# --------------------------------------------------------------------------------------------

#: A run during which other processes used more than this many CPUs on average is "contended".
CONTENDED = 0.15


def busy_seconds() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until the rest of the machine uses < CONTENDED CPUs for two
    consecutive 0.5 s windows; returns the seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    while time.monotonic() - t0 < max_wait:
        b0 = busy_seconds()
        time.sleep(0.5)
        b1 = busy_seconds()
        if b0 is None or b1 is None:
            break
        quiet = quiet + 1 if (b1 - b0) / 0.5 < CONTENDED else 0
        if quiet >= 2:
            break
    return time.monotonic() - t0


def run_child(kind: str, args: list[str], workdir: str) -> tuple[float, dict[str, Any]]:
    """Run one job in a fresh process; returns (wall seconds, the child's side-file record
    plus ``other_cpus``: the CPUs other processes used on average meanwhile)."""
    side = os.path.join(workdir, "side.json")
    if os.path.exists(side):
        os.unlink(side)
    cmd = [sys.executable, "-c", _RUNNER, side, kind, *args]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0 = busy_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=os.environ.copy()
    )
    seconds = time.perf_counter() - t0
    b1 = busy_seconds()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open(side) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        info = {"rc": proc.returncode or 98}
    if proc.returncode != 0 or info.get("rc", 0) != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(
            f"child '{kind} {' '.join(args)}' failed (exit {proc.returncode}, rc {info.get('rc')})"
        )
    # CPU of the whole child process, start-up to exit (the side file's figure stops earlier).
    info["cpu_s"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    other = 0.0 if b0 is None or b1 is None else max(0.0, b1 - b0 - info["cpu_s"])
    info["other_cpus"] = other / seconds
    return seconds, info


def measure(jobs: list[Job], workdir: str, repeat: int, max_wait: float) -> list[Measurement]:
    """Run every job ``repeat`` times, round-robin, each run after waiting (up to max_wait s)
    for the machine to be idle, printing each run to stderr. The reported time is the median
    of the uncontended runs (all runs when every one was contended)."""
    runs: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in jobs]
    for r in range(repeat):
        for job, out in zip(jobs, runs, strict=True):
            waited = wait_idle(max_wait) if max_wait > 0 else 0.0
            seconds, info = run_child(job.kind, job.args, workdir)
            out.append((seconds, info))
            sys.stderr.write(
                f"  [run {r + 1}/{repeat}] {job.label}: {seconds:.1f} s wall, "
                f"{info['cpu_s']:.1f} s cpu; other processes used {info['other_cpus']:.2f} "
                f"CPUs meanwhile{' (CONTENDED)' if info['other_cpus'] > CONTENDED else ''}"
                f"{f'; waited {waited:.0f} s for idle' if waited > 1.5 else ''}\n"
            )
    result = []
    for job, out in zip(jobs, runs, strict=True):
        infos = [i for _, i in out]
        clean = [(t, i) for t, i in out if i["other_cpus"] <= CONTENDED] or out
        extra = dict(infos[-1].get("extra", {}))
        if "analyze_s" in extra:
            extra["analyze_s"] = statistics.median(i["extra"]["analyze_s"] for _, i in clean)
        result.append(
            Measurement(
                label=job.label,
                seconds=statistics.median(t for t, _ in clean),
                times=[t for t, _ in out],
                contended=[i["other_cpus"] > CONTENDED for i in infos],
                maxrss_mib=max(i["maxrss_kb"] for i in infos) / 1024,
                anon_mib=max(i["peak_anon_kb"] for i in infos) / 1024,
                file_mib=max(i["peak_file_kb"] for i in infos) / 1024,
                cpu_s=statistics.median(i["cpu_s"] for _, i in clean),
                extra=extra,
            )
        )
    return result


def show(
    m: Measurement, width: int, lower: Measurement | None = None, target: float | None = None
) -> None:
    ratio = ""
    if lower is not None:
        ratio = f"{m.seconds / lower.seconds:5.2f}x lower bound"
        if target is not None:
            ok = "ok" if m.seconds / lower.seconds <= target else "MISSED"
            ratio += f"   (target <= {target:.2f}x: {ok})"
    reps = ""
    if len(m.times) > 1 or any(m.contended):
        reps = "   runs: " + ", ".join(
            f"{t:.1f}{'*' if c else ''}" for t, c in zip(m.times, m.contended, strict=True)
        )
        if all(m.contended):
            reps += " (all contended!)"
    cpu = f"cpu {m.cpu_s:6.1f} s"
    if lower is not None:
        cpu += f" ({m.cpu_s / lower.cpu_s:4.2f}x)"
    log(f"{m.label:<{width}} {m.seconds:7.1f} s   {ratio:<47} {cpu:<19}   {m.rss_text()}{reps}")


# --------------------------------------------------------------------------------------------


def environment_summary() -> None:
    log(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    log(
        f"host: nproc={os.cpu_count()} (sched affinity {len(os.sched_getaffinity(0))}), "
        f"{_cpu_model()}, {_mem_total()}, {platform.platform()}"
    )
    log(f"python {platform.python_version()} ({sys.executable})")
    import safetensors
    import torch

    versions = [
        f"numpy {np.__version__}",
        f"torch {torch.__version__}",
        f"safetensors {safetensors.__version__}",
    ]
    try:
        from importlib.metadata import version

        versions.append(f"weightwatcher {version('weightwatcher')}")
        versions.append(f"htsr {version('htsr')}")
    except Exception:  # noqa: BLE001 - informative only
        pass
    log("versions: " + ", ".join(versions))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", repo, "log", "-1", "--format=%h %cd", "--date=iso"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "htsr_cli"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        log(
            f"htsr source: commit {head}"
            + (" + uncommitted changes in htsr_cli/" if dirty else " (htsr_cli/ clean)")
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    env = {
        k: v
        for k, v in os.environ.items()
        if re.match(r"(OPENBLAS|OMP|MKL|GOTO|BLIS|VECLIB|NUMEXPR)_", k)
    }
    log(
        "BLAS/threading env (passed unchanged to every child): "
        + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(none set)")
    )
    log(
        f"torch: {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}, "
        f"cuda {'yes' if torch.cuda.is_available() else 'no'}"
    )
    try:
        import scipy.linalg  # noqa: F401 - loads scipy's own BLAS, as WeightWatcher does
        from threadpoolctl import threadpool_info
    except ImportError:
        log("threadpoolctl: not importable")
        return
    pools = [
        f"{p.get('internal_api')}:{os.path.basename(p.get('filepath', ''))} "
        f"{p.get('version') or ''} threads={p.get('num_threads')}"
        + (f" coretype={p['architecture']}" if p.get("architecture") else "")
        for p in threadpool_info()
    ]
    log("threadpools (numpy, scipy, torch loaded): " + "; ".join(pools))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as fh:
            kb = int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1))
        return f"{kb / 1024**2:.1f} GiB RAM"
    except (OSError, AttributeError):
        return "? RAM"


def main_benchmark(args: argparse.Namespace, workdir: str) -> None:
    from htsr_cli.engine.metrics import METRICS

    t0 = time.perf_counter()
    path, reused = build_checkpoint(workdir, args.blocks, args.seed)
    shapes = block_tensors(args.blocks)
    largest = max(shapes, key=lambda t: math.prod(t[1]))
    size = os.path.getsize(path)
    log(
        f"\ncheckpoint: {path}\n  {'reused' if reused else 'written'} in "
        f"{time.perf_counter() - t0:.1f} s: {args.blocks} GPT-2-medium blocks, {len(shapes)} "
        f"float32 matrices in nn.Linear (out, in) layout, {size / MiB:.0f} MiB; largest single "
        f"tensor {largest[0]} {largest[1][0]}x{largest[1][1]} = "
        f"{4 * math.prod(largest[1]) / MiB:.1f} MiB"
    )
    log(
        "  each line: median wall time over --repeat whole processes (start-up, imports and "
        "file reading included), their median user+sys CPU time (and its ratio to the lower "
        "bound's), and the largest peak RSS; "
        f"runs marked * had other processes using > {CONTENDED} CPUs and are left out of the "
        "median"
    )

    nine = ",".join(m for m in METRICS if m != "rand_distance")
    dev = args.device
    tdev = dev if dev.startswith("cuda") else "cpu"
    out_alpha = os.path.join(workdir, "htsr-alpha.json")
    common = ["--format", "json", "--no-progress", "--device", dev]
    # Lower bound: numpy and torch both tried; the faster is the bound (CUDA: torch only).
    backends = ["numpy", "torch"] if dev == "cpu" else ["torch"]
    if args.lower_bound != "auto":
        backends = [args.lower_bound]
    jobs = [Job("start-up floor (python + import torch, htsr)", "floor", [])]
    jobs += [
        Job(
            f"lower bound ({b} eigvalsh, float64{', ' + tdev if b == 'torch' else ''})",
            f"lower-{b}",
            [path] if b == "numpy" else [path, tdev],
        )
        for b in backends
    ]
    if dev == "cpu":
        jobs.append(Job("  for reference: numpy, one matrix per core", "parallel-numpy", [path]))
    jobs += [
        # alpha only: its JSON (a ~10 KB file) feeds the alpha check against WeightWatcher.
        Job(
            "htsr analyze (alpha only)",
            "htsr",
            ["analyze", path, "--metrics", "alpha", "-o", out_alpha, *common],
        ),
        Job(
            "htsr analyze (9 metrics, no rand_distance)",
            "htsr",
            ["analyze", path, "--metrics", nine, "-o", "/dev/null", *common],
        ),
        Job("htsr analyze (all 10 metrics)", "htsr", ["analyze", path, "-o", "/dev/null", *common]),
    ]
    if not args.skip_ww:
        jobs.append(Job("weightwatcher 0.7.7 analyze()", "ww", [path, "default"]))
        if args.ww_randomize:
            jobs.append(
                Job("weightwatcher 0.7.7 analyze(randomize=True)", "ww", [path, "randomize"])
            )
    for job in jobs:
        if job.kind == "htsr":
            log(f"  {job.label}: htsr {' '.join(job.args)}")
    log("")
    measured = measure(jobs, workdir, args.repeat, args.wait_idle)
    res = {m.label: m for m in measured}

    W = 44
    show(res[jobs[0].label], W)
    cands = {j.kind[len("lower-") :]: res[j.label] for j in jobs if j.kind.startswith("lower-")}
    best = min(cands, key=lambda b: cands[b].seconds)
    lower = cands[best]
    show(lower, W)
    for b, m in cands.items():
        if b != best:
            show(m, W, lower)
    if len(cands) > 1:
        log(
            "  lower-bound candidates: "
            + " | ".join(f"{b} {m.seconds:.1f} s" for b, m in cands.items())
            + f"  -> {best} is the bound"
        )
    parallel = res.get("  for reference: numpy, one matrix per core")
    if parallel is not None:
        show(parallel, W, lower)
        log(
            "    (the bound's work with one BLAS thread per matrix and the matrices spread over "
            "the cores, as htsr runs it; not the target's reference)"
        )
    show(res["htsr analyze (alpha only)"], W, lower)
    h9 = res["htsr analyze (9 metrics, no rand_distance)"]
    show(h9, W, lower, 1.25)
    h10 = res["htsr analyze (all 10 metrics)"]
    show(h10, W, lower, 2.50)
    if parallel is not None:
        log(
            f"  against the one-matrix-per-core reference: 9 metrics "
            f"{h9.seconds / parallel.seconds:.2f}x, all 10 {h10.seconds / parallel.seconds:.2f}x"
        )

    if args.skip_ww:
        log("weightwatcher: skipped (--skip-ww)")
        return
    ww = res["weightwatcher 0.7.7 analyze()"]
    show(ww, W, lower)
    log(
        f"  (of which WeightWatcher.analyze() itself: median {ww.extra['analyze_s']:.1f} s; the "
        "rest is "
        "start-up and building the nn.Module)"
    )
    if args.ww_randomize:
        show(res["weightwatcher 0.7.7 analyze(randomize=True)"], W, lower)
    log(
        f"weightwatcher analyze() time / htsr time: {ww.seconds / h9.seconds:.2f} (htsr 9 "
        f"metrics), {ww.seconds / h10.seconds:.2f} (htsr all 10; ww's default computes no "
        "rand_distance)"
    )

    with open(out_alpha) as fh:
        ours = {row["name"]: row["alpha"] for row in json.load(fh)["layers"]}
    theirs = ww.extra["alpha"]
    common = sorted(set(ours) & set(theirs))
    missing = sorted(set(ours) ^ set(theirs))
    rel = []
    for name in common:
        a, b = ours[name], theirs[name]
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            rel.append((math.inf if (a is None) != (b is None) else 0.0, name))
        else:
            rel.append((abs(a - b) / abs(b), name))
    worst, worst_name = max(rel) if rel else (math.nan, "-")
    verdict = "ok" if worst <= 1e-3 and not missing else "MISMATCH"
    log(
        f"alpha check: {len(common)} layers in both, max relative |alpha_htsr - alpha_ww| / "
        f"alpha_ww = {worst:.2e} ({worst_name}: htsr {ours.get(worst_name)}, ww "
        f"{theirs.get(worst_name)}), tolerance 1e-3: {verdict}"
        + (f"; only in one tool: {missing[:5]}" if missing else "")
    )


def memory_test(args: argparse.Namespace, workdir: str) -> None:
    directory = os.path.join(workdir, "hf-sharded")
    t0 = time.perf_counter()
    total, largest = build_sharded(directory, args.memory_gb, args.memory_shards, args.seed)
    shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    sizes = ", ".join(f"{os.path.getsize(os.path.join(directory, s)) / MiB:.0f}" for s in shards)
    log(
        f"\nmemory test: {directory}\n  written in {time.perf_counter() - t0:.1f} s: "
        f"{len(shards)} shards + model.safetensors.index.json, {total / MiB:.0f} MiB in all "
        f"(shards {sizes} MiB); largest tensor {WTE[0]}.weight {WTE[1][0]}x{WTE[1][1]} float32 = "
        f"{largest / MiB:.0f} MiB"
    )
    W = 44
    floor, m = measure(
        [
            Job("start-up floor (python + import torch, htsr)", "floor", []),
            Job(
                "htsr analyze DIR --metrics alpha,stable_rank",
                "htsr",
                [
                    "analyze",
                    directory,
                    "--metrics",
                    "alpha,stable_rank",
                    "--format",
                    "json",
                    "-o",
                    "/dev/null",
                    "--no-progress",
                    "--device",
                    args.device,
                ],
            ),
        ],
        workdir,
        1,
        args.wait_idle,
    )
    show(floor, W)
    show(m, W)
    grow = m.maxrss_mib - floor.maxrss_mib
    grow_anon = m.anon_mib - floor.anon_mib
    log(
        f"  checkpoint {total / MiB:.0f} MiB | largest tensor {largest / MiB:.0f} MiB | "
        f"peak RSS {m.maxrss_mib:.0f} MiB = start-up {floor.maxrss_mib:.0f} + {grow:.0f} MiB"
    )
    log(
        f"  peak RSS above start-up = {grow / (largest / MiB):.1f}x the largest tensor = "
        f"{grow / (total / MiB):.2f}x the checkpoint size "
        f"(anonymous memory: +{grow_anon:.0f} MiB = {grow_anon / (largest / MiB):.1f}x largest "
        f"tensor; file-backed mmap pages peak {m.file_mib:.0f} MiB)"
    )
    # float32 tensor + its float64 copy = 3x the tensor; allow 4x + 128 MiB of slack.
    limit = 4 * largest / MiB + 128
    verdict = (
        "peak RSS follows the largest tensor, not the checkpoint size"
        if grow <= limit and grow < 0.5 * total / MiB
        else f"peak RSS grows beyond 4x the largest tensor + 128 MiB ({limit:.0f} MiB): "
        "it does NOT only follow the largest tensor"
    )
    log(f"  verdict: {verdict}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python benchmarks/analyze_vs_weightwatcher.py --blocks 2 --skip-ww",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=24,
        help="GPT-2-medium blocks in the checkpoint (4 matrices each)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per measurement; the median time is reported"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--workdir",
        default=None,
        help="where to write checkpoints (default: a new temporary directory); a "
        "matching checkpoint already there is reused",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the generated checkpoints (default: delete them at the end)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="passed to htsr --device; with cuda the lower bound uses torch on CUDA",
    )
    p.add_argument(
        "--lower-bound",
        choices=("auto", "numpy", "torch"),
        default="auto",
        help="eigvalsh backend of the lower bound; auto tries both once on CPU and "
        "keeps the faster",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OMP/MKL/OPENBLAS_NUM_THREADS to this for every child (default: "
        "leave the environment unchanged)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to leave "
        "the CPUs idle (0: do not wait); runs during which other processes "
        "were busy are marked * and left out of the median",
    )
    p.add_argument("--skip-ww", action="store_true", help="do not run WeightWatcher (slow)")
    p.add_argument(
        "--ww-randomize",
        action="store_true",
        help="also time WeightWatcher analyze(randomize=True) (very slow)",
    )
    p.add_argument(
        "--memory-test",
        action="store_true",
        help="also run the sharded-checkpoint peak-memory test",
    )
    p.add_argument(
        "--memory-gb", type=float, default=2.0, help="size of the --memory-test checkpoint in GB"
    )
    p.add_argument(
        "--memory-shards",
        type=int,
        default=4,
        help="number of shards of the --memory-test checkpoint",
    )
    args = p.parse_args(argv)
    if args.blocks < 1 or args.repeat < 1:
        p.error("--blocks and --repeat must be positive")
    if args.device == "auto":  # resolve here so that the lower bound uses the same device
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be positive")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # inherited by every child alike
    given = argv if argv is not None else sys.argv[1:]
    log(f"$ python benchmarks/{os.path.basename(__file__)} {' '.join(given)}")
    environment_summary()
    created = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="htsr-bench-") if created else args.workdir
    os.makedirs(workdir, exist_ok=True)
    made: list[str] = []
    try:
        before = set(os.listdir(workdir))
        t0 = time.perf_counter()
        try:
            main_benchmark(args, workdir)
            if args.memory_test:
                memory_test(args, workdir)
        finally:
            made = [n for n in os.listdir(workdir) if n not in before]
        log(f"\ntotal {time.perf_counter() - t0:.0f} s")
    finally:
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for name in made + ["side.json", "htsr-alpha.json"]:
                target = os.path.join(workdir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                elif os.path.exists(target):
                    os.unlink(target)


if __name__ == "__main__":
    main()
