"""The ``ww`` fit's KS scan on long spectra: the plain quadratic scan (every D_i over its
whole tail) against the bounded one (``htsr_cli.engine.fit.ks_argmin``), same argmin.

    python benchmarks/ks_scan.py                      # chi-square and power law, n up to 2^18
    python benchmarks/ks_scan.py --plain-max 65536    # time the plain scan up to this n

A 1x1xKxK conv has K*K pooled eigenvalues, each a squared weight halved (chi-square); a pure
power law (Pareto) is the hardest case for the bounds. Run with OMP_NUM_THREADS=1 to compare
with the numbers in docs/engine.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from htsr_cli.engine import fit


def spectrum(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "chi2":
        x = torch.randn(n, generator=g, dtype=torch.float64) ** 2 / 2
    else:
        x = torch.rand(n, generator=g, dtype=torch.float64) ** (-1 / 1.5)
    x = torch.sort(x).values
    return x[x > fit.EVALS_THRESH] if hasattr(fit, "EVALS_THRESH") else x[x > 1e-5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536,262144")
    ap.add_argument("--plain-max", type=int, default=65536, help="largest n for the plain scan")
    args = ap.parse_args()
    for kind in ("chi2", "pareto"):
        for n in map(int, args.sizes.split(",")):
            x = spectrum(kind, n)
            logx = torch.log(x)
            alpha, _ = fit._alphas(logx, small_n=False)
            idx = torch.arange(x.numel() - 1)
            t0 = time.perf_counter()
            k, d = fit.ks_argmin(x, logx, alpha, idx)
            bounded = time.perf_counter() - t0
            line = f"{kind:7s} n={n:8d}  bounded {bounded:7.2f} s  xmin index {k}  D {d:.6g}"
            if n <= args.plain_max:
                t0 = time.perf_counter()
                full = fit._ks_distances(x, logx, alpha, idx)
                plain = time.perf_counter() - t0
                same = int(torch.argmin(full)) == k and float(full.min()) == d
                line += f"  plain {plain:7.2f} s  same argmin and D: {same}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
