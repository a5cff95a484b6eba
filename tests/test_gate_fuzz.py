"""Gate-string fuzzer (issue 15, "Keep the fuzzers"): mutated ``--fail-if`` expressions through
the real CLI (``htsr gate REPORT --baseline REPORT --fail-if EXPR -o OUT``, in process).

Each case must exit 0, 1 or 2; on 2, write exactly one stderr line ``htsr: error: ...`` and
no output file and no temporary file; on 0 or 1, write a report whose ``passed`` agrees with
the exit code. A per-case time bound catches super-linear parsing (a 100,000-digit number
never finished in 0.1). Seeded: a failure names its seed and case, and replays.

The fast run (a few hundred cases) is in the normal suite; a longer one is marked slow.
"""

from __future__ import annotations

import collections
import json
import random
import time
from pathlib import Path

import clirunner
import pytest

from htsr_cli.engine.gates import parse_gate
from htsr_cli.errors import InputError

SEEDS = (
    "alpha > 6",
    "alpha < 2 on 'features.*'",
    "mean(alpha) > 4.5",
    "count(alpha < 2) > 3",
    "max(log_spectral_norm) > 3",
    "delta(alpha) > 0.2",
    "mean(delta(alpha)) > 0.1",
    'max(ratio(spectral_norm)) > 1.5 on "features.*"',
    "count(ratio(stable_rank) >= 1.1) > 0",
    "added > 0",
    "count(removed) > 0",
    "count(nonfinite) > 0",
    "std(alpha) >= 1e-3",
    "N != 10 on classifier.?",
)
PIECES = (
    "(", ")", "<", ">", "=", "!", "<=", ">=", "==", "!=", "'", '"', " ", "on", "*", ".",
    "-", "+", "e", "E", "inf", "nan", "delta(", "ratio(", "count(", "mean(", "alpha",
    "added", "nonfinite", "\x00", "\x1b[31m", "\n", "[/]", "[link=x]", "é", "\ud800",
    "1" * 50, "9" * 2000, "0." + "3" * 5000, "(" * 200, ")" * 200, "__import__('os')",
)  # fmt: skip
CASE_SECONDS = 5.0  # generous: a case takes milliseconds; the 0.1 parser took minutes


def mutate(rng: random.Random) -> str:
    text = rng.choice(SEEDS)
    # Few mutations are as useful as many: they reach evaluation, not only the parser's errors.
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3, 4))):
        pos = rng.randint(0, len(text))
        op = rng.random()
        if op < 0.4:
            text = text[:pos] + rng.choice(PIECES) + text[pos:]
        elif op < 0.7:
            text = text[:pos] + text[pos + rng.randint(1, 4) :]
        elif op < 0.9:
            text = text[:pos] + chr(rng.randint(32, 126)) + text[pos + 1 :]
        else:
            text = text[:pos] + rng.choice(SEEDS) + text[pos:]
    return text


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "report.json"
    metrics = "alpha,stable_rank,log_spectral_norm,spectral_norm"
    proc = clirunner.run(["analyze", "--metrics", metrics, "-f", "json", "-o", path])
    assert proc.returncode == 0, proc.stderr
    return path


def fuzz(report: Path, work: Path, seed: int, cases: int) -> collections.Counter:
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    out = work / "out.json"
    for case in range(cases):
        expr = mutate(rng)
        where = f"seed {seed} case {case}: {expr[:120]!r}"
        t0 = time.perf_counter()
        proc = clirunner.run(
            ["gate", report, "--baseline", report, "--no-config", f"--fail-if={expr}", "-o", out],
            cwd=work,
        )
        seconds = time.perf_counter() - t0
        assert seconds < CASE_SECONDS, (where, seconds)
        assert proc.returncode in (0, 1, 2), (where, proc.returncode, proc.stderr[-500:])
        counts[proc.returncode] += 1
        assert sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp")) == [], where
        if proc.returncode == 2:
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("htsr: error: "), (where, lines)
            assert not out.exists(), where
        else:
            doc = json.loads(out.read_text())
            assert doc["passed"] is (proc.returncode == 0), where
            out.unlink()
    return counts


def test_gate_string_fuzzer(report, tmp_path):
    # ~35 ms a case, nearly all of it typer building the command line: 100 cases stay fast.
    counts = fuzz(report, tmp_path, seed=11, cases=100)
    # Both outcomes are reached: the fuzzer is not just producing syntax errors.
    assert counts[2] > 0 and counts[0] + counts[1] > 0, counts


def test_gate_parser_fuzzer():
    """Many more strings through the parser alone: a Gate or one line of InputError."""
    rng = random.Random(15)
    outcomes: collections.Counter = collections.Counter()
    for case in range(3000):
        expr = mutate(rng)
        t0 = time.perf_counter()
        try:
            gate = parse_gate(expr)
        except InputError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith("malformed --fail-if "), case
            assert len(message) < 1000, case
            outcomes["error"] += 1
        else:
            assert gate.op in (">", ">=", "<", "<=", "==", "!="), case
            outcomes["gate"] += 1
        assert time.perf_counter() - t0 < CASE_SECONDS, (case, expr[:120])
    assert outcomes["error"] > 0 and outcomes["gate"] > 0, outcomes


@pytest.mark.slow
def test_gate_string_fuzzer_long(report, tmp_path):
    total: collections.Counter = collections.Counter()
    for seed in range(1, 5):
        total += fuzz(report, tmp_path, seed=seed, cases=1000)
    assert sum(total.values()) == 4000
    print("gate fuzz counts by exit code:", dict(sorted(total.items())))
