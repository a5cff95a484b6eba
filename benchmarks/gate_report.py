"""How long ``htsr gate`` takes on a stored report of many layers (issue 11: "well under a
second on a report of 1,000 layers").

Writes two ``htsr.analysis/1`` documents of ``--layers`` layers (all ten metrics and the fit
columns, values drawn from a seeded generator; the second a perturbed copy of the first, with
one layer renamed), then times:

1. ``htsr gate`` as a fresh process (what CI pays: interpreter start, imports, reading both
   reports, pairing, five gates, JUnit output), ``--repeat`` times, median and min;
2. the library call :func:`htsr_cli.gate.run.run_gate` alone, in this process.

Usage::

    python benchmarks/gate_report.py                 # 1,000 layers, 5 repeats
    python benchmarks/gate_report.py --layers 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from htsr_cli.engine.columns import METRICS

GATES = [
    "alpha > 6",
    "count(alpha < 2) > 1000",
    "delta(alpha) > 0.5",
    "mean(delta(alpha)) > 0.1",
    "max(ratio(spectral_norm)) > 1.5 on 'blocks.*'",
]


def report(n: int, seed: int, rename: bool) -> dict:
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        row = {"name": f"blocks.{i // 4}.w{i % 4}", "type": "linear", "N": 1024, "M": 1024,
               "Q": 1.0, "rf": 1, "num_evals": 1024}  # fmt: skip
        row.update({m: rng.uniform(1.5, 7.0) for m in METRICS})
        row.update(xmin=0.1, xmax=9.0, D=0.05, sigma=0.1, num_pl_spikes=40, matrix_rank=1024,
                   status="success", warning="")  # fmt: skip
        layers.append(row)
    if rename:
        layers[-1]["name"] = "head.new"
    return {
        "schema": "htsr.analysis/1",
        "source": {"path": "synthetic", "format": "safetensors", "files": []},
        "options": {
            "fit": "ww",
            "metrics": list(METRICS),
            "min_evals": 8,
            "seed": 0,
            "evals_thresh": 1e-5,
        },  # fmt: skip
        "summary": {},
        "layers": layers,
        "skipped": [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "base.json").write_text(json.dumps(report(args.layers, 0, False)))
        (d / "new.json").write_text(json.dumps(report(args.layers, 1, True)))
        argv = ["gate", str(d / "new.json"), "--baseline", str(d / "base.json"), "--no-config",
                "-f", "junit", "-o", str(d / "gates.xml")]  # fmt: skip
        for g in GATES:
            argv += ["--fail-if", g]
        walls = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "htsr_cli", *argv], capture_output=True)
            walls.append(time.perf_counter() - t0)
            assert proc.returncode in (0, 1), proc.stderr.decode()
        from htsr_cli.gate.run import run_gate

        libs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                run_gate(str(d / "new.json"), baseline=str(d / "base.json"), fail_if=GATES,
                         use_config=False, fmt="junit", output=str(d / "lib.xml"))  # fmt: skip
            libs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        torch_s = time.perf_counter() - t0
    print(f"htsr gate, {args.layers} layers, {len(GATES)} gates, baseline, junit output")
    print(f"  whole process: median {statistics.median(walls):.3f} s, min {min(walls):.3f} s")
    print(f"  run_gate only: median {statistics.median(libs):.3f} s, min {min(libs):.3f} s")
    print(f"  for scale, a process that only imports torch: {torch_s:.3f} s")


if __name__ == "__main__":
    main()
