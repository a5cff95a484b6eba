"""End-to-end tests of ``htsr allocate``: real subprocesses, a real shell pipe, real files.

Contract (docs/allocate.md): exit 0 ok, 2 usage or input error with exactly one
``htsr: error:`` line on stderr and no output file; ``-o FILE`` is written atomically.
Independent runs are started together (``run_many``) to keep the module fast.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import clirunner
import pytest

from htsr_cli.assets import default_checkpoint

TIMEOUT = 180
CKPT = str(default_checkpoint())
DEMO_LAYERS = [
    "features.0",
    "features.2",
    "features.6",
    "classifier.0",
    "classifier.3",
    "classifier.5",
]  # model order, recorded in the file
OLD = "OLD CONTENT, must survive a failed run\n"


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def htsr(*args: Any, stdin: str | None = None, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    """``htsr allocate ARGS`` through the real CLI entry point, in process (clirunner);
    stdin from ``stdin`` (else empty)."""
    return clirunner.run(["allocate", *args], stdin=stdin, env=_env(), cwd=cwd)


def shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, shell=True, capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )


def run_many(calls: dict[str, Any]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every ``(function, args, kwargs)`` concurrently; results by key."""
    with ThreadPoolExecutor(max_workers=min(len(calls), 6)) as pool:
        futures = {k: pool.submit(f, *a, **kw) for k, (f, a, kw) in calls.items()}
        return {k: fut.result() for k, fut in futures.items()}


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "htsr: error" not in proc.stderr, proc.stderr


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsr: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == "", proc.stdout


def strict_json(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON constant {token!r}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An analysis of the demo checkpoint (in process), variants of it, and a plan."""
    from htsr_cli.allocate.schemes import allocate
    from htsr_cli.engine.analysis import analyze

    root = tmp_path_factory.mktemp("alloc")
    analysis = analyze(CKPT, metrics=["alpha"], device="cpu").to_dict()
    paths = {"root": root, "analysis": analysis}

    def write(name: str, doc: Any) -> str:
        p = root / name
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        paths[name] = str(p)
        return str(p)

    write("a.json", analysis)
    write("plan.json", allocate(analysis, lr=0.1).to_dict())
    write("v9.json", {**analysis, "schema": "htsr.analysis/9"})
    write("nolayers.json", {k: v for k, v in analysis.items() if k != "layers"})
    return paths


@pytest.fixture(scope="module")
def runs(docs: dict[str, Any]) -> dict[str, subprocess.CompletedProcess[str]]:
    a = docs["a.json"]
    root: Path = docs["root"]
    (root / "exists.json").write_text(OLD)
    q = shlex.quote
    py = q(sys.executable)
    calls = {
        "pipe": (
            shell,
            (
                f"{py} -m htsr_cli analyze {q(CKPT)} --format json --metrics alpha "
                f"--device cpu | {py} -m htsr_cli allocate - --lr 0.1 --format json",
            ),
            {},
        ),
        # the pipe's analysis has analyze's default fit (ww); allocate's own default is median
        "ckpt": (
            htsr,
            (CKPT, "--lr", "0.1", "--format", "json", "--device", "cpu", "--fit", "ww"),
            {},
        ),
        "csv": (
            htsr,
            (
                a,
                "--lr",
                "0.2",
                "--all-layers",
                "--min-evals",
                "0",
                "--wd",
                "5e-4",
                "-o",
                root / "plan.csv",
            ),
            {},
        ),
        "table": (
            htsr,
            (
                a,
                "--lr",
                "0.1",
                "--format",
                "table",
                "--scheme",
                "sample-rank",
                "--all-layers",
                "--min-evals",
                "0",
            ),
            {},
        ),
        "json-default": (
            htsr,
            ("-", "--lr", "0.1", "--scheme", "power:1/2"),
            {"stdin": Path(a).read_text()},
        ),
        # rejections: one line, exit 2, no output file
        "plan-as-analysis": (htsr, (docs["plan.json"], "--lr", "0.1", "-o", root / "e1.json"), {}),
        "version": (
            htsr,
            ("-", "--lr", "0.1", "-o", root / "e2.json"),
            {"stdin": Path(docs["v9.json"]).read_text()},
        ),
        "no-layers": (htsr, (docs["nolayers.json"], "--lr", "0.1"), {}),
        "scheme": (htsr, (a, "--lr", "0.1", "--scheme", "cosine", "-o", root / "exists.json"), {}),
        "metric": (htsr, (a, "--lr", "0.1", "--metric", "beta"), {}),
        "absent-metric": (htsr, (a, "--lr", "0.1", "--metric", "entropy"), {}),
        "lr0": (htsr, (a, "--lr", "0", "-o", root / "e3.json"), {}),
        "lr-1": (htsr, (a, "--lr", "-1"), {}),
        "s1s2": (htsr, (a, "--lr", "0.1", "--s1", "2", "--s2", "1"), {}),
        "malformed": (
            htsr,
            ("-", "--lr", "0.1", "-o", root / "e4.json"),
            {"stdin": '{"schema": "htsr.analysis/1", '},
        ),
        "empty": (htsr, ("-", "--lr", "0.1"), {"stdin": ""}),
        "fit-on-json": (htsr, (a, "--lr", "0.1", "--fit", "median"), {}),
        "power": (htsr, (a, "--lr", "0.1", "--scheme", "power:x"), {}),
        "missing-ckpt": (htsr, (root / "nope.safetensors", "--lr", "0.1"), {}),
    }
    return run_many(calls)


def test_analyze_pipe_into_allocate(runs: dict[str, Any], docs: dict[str, Any]) -> None:
    proc = runs["pipe"]
    assert_ok(proc)
    plan = strict_json(proc.stdout)
    assert plan["schema"] == "htsr.lr-plan/1" and plan["scheme"] == "tb-linear"
    assert plan["base_lr"] == 0.1 and plan["metric"] == "alpha"
    assert [x["name"] for x in plan["layers"]] == DEMO_LAYERS
    assert plan["source"]["analysis"] == "stdin" and plan["source"]["path"] == CKPT
    assert plan["source"]["files"][0]["sha256"]
    by = {x["name"]: x for x in plan["layers"]}
    # first/last in analyze's order; 9 and 10 eigenvalues < 50
    assert "first layer" in by["features.0"]["reason"]
    assert "last layer" in by["classifier.5"]["reason"]
    assert "< min_evals 50" in by["features.0"]["reason"]
    assert "< min_evals 50" in by["classifier.5"]["reason"]
    assert [by[n]["multiplier"] for n in ("features.6", "features.2")] == [0.5, 1.5]
    for x in plan["layers"]:
        assert x["lr"] == pytest.approx(0.1 * x["multiplier"])
        assert x["status"] == ("allocated" if "reason" not in x else "base")
    s = plan["summary"]
    mults = [x["multiplier"] for x in plan["layers"]]
    assert s["min"] == 0.5 and s["max"] == 1.5
    assert s["mean_multiplier"] == pytest.approx(sum(mults) / len(mults))
    assert set(plan["params"]) >= {
        "s1",
        "s2",
        "seed",
        "invert",
        "min_evals",
        "all_layers",
        "clipped",
    }


def test_checkpoint_source_matches_the_pipe(runs: dict[str, Any]) -> None:
    assert_ok(runs["ckpt"])
    direct = strict_json(runs["ckpt"].stdout)
    piped = strict_json(runs["pipe"].stdout)
    assert [(x["name"], x["multiplier"]) for x in direct["layers"]] == [
        (x["name"], x["multiplier"]) for x in piped["layers"]
    ]
    assert "analysis" not in direct["source"]
    assert direct["params"]["analysis_options"]["metrics"] == ["alpha"]


def test_output_file_by_extension(runs: dict[str, Any], docs: dict[str, Any]) -> None:
    proc = runs["csv"]
    assert_ok(proc)
    assert proc.stdout == ""
    path = docs["root"] / "plan.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["name"] for r in rows] == DEMO_LAYERS
    assert list(rows[0]) == [
        "name",
        "metric_value",
        "multiplier",
        "lr",
        "wd_multiplier",
        "wd",
        "status",
        "reason",
    ]
    for r in rows:
        assert float(r["lr"]) == pytest.approx(0.2 * float(r["multiplier"]))
        assert float(r["wd"]) == pytest.approx(5e-4 * float(r["wd_multiplier"]))
        assert r["status"] == "allocated"
    assert not [p for p in docs["root"].iterdir() if p.name.endswith(".tmp")]


def test_table(runs: dict[str, Any]) -> None:
    proc = runs["table"]
    assert_ok(proc)
    out = proc.stdout
    for name in DEMO_LAYERS:
        assert name in out
    assert "scheme=sample-rank" in out and "█" in out and "multiplier mean 1" in out
    assert "\x1b[" not in out  # no colour in a pipe


def test_json_in_a_pipe_by_default(runs: dict[str, Any]) -> None:
    proc = runs["json-default"]
    assert_ok(proc)
    plan = strict_json(proc.stdout)
    assert plan["scheme"] == "power:1/2" and plan["params"]["p"] == 0.5
    assert plan["summary"]["mean_multiplier"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "key, needles",
    [
        ("plan-as-analysis", ("'htsr.lr-plan/1' document, expected 'htsr.analysis/1'",)),
        ("version", ("stdin has schema version 'htsr.analysis/9'",)),
        ("no-layers", ("lacks field(s) layers",)),
        ("scheme", ("unknown scheme 'cosine'", "tb-linear", "sample-emg")),
        ("metric", ("unknown metric 'beta'", "alpha_weighted")),
        ("absent-metric", ("analysis has no metric entropy", "--metrics entropy")),
        ("lr0", ("--lr must be a positive number",)),
        ("lr-1", ("--lr must be a positive number",)),
        ("s1s2", ("--s1 (2.0) must not exceed --s2 (1.0)",)),
        ("malformed", ("stdin is not valid JSON",)),
        ("empty", ("stdin is empty",)),
        ("fit-on-json", ("--fit applies only to a checkpoint source",)),
        ("power", ("P must be a positive number",)),
        ("missing-ckpt", ("nope.safetensors",)),
    ],
)
def test_rejections(runs: dict[str, Any], key: str, needles: tuple[str, ...]) -> None:
    assert_one_line_error(runs[key], *needles)


def test_no_output_file_on_error(runs: dict[str, Any], docs: dict[str, Any]) -> None:
    root: Path = docs["root"]
    for name in ("e1.json", "e2.json", "e3.json", "e4.json"):
        assert not (root / name).exists()
    assert (root / "exists.json").read_text() == OLD
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
