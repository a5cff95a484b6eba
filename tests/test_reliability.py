"""Reliability (issue 15): what an adversarial input, a signal or a full disk must not break.

Each test stands for a class of failures: names shown literally in every table, documents
validated fully at the reader, whole run directories on resume, shards inside their model
directory, bounded work, signals and output errors, honest messages. Real files, real
checkpoints, the real CLI (in process through ``clirunner`` unless the process matters).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import clirunner
import pytest
import torch
from safetensors.torch import save_file

ERROR_LINE = re.compile(r"^htsr: error: [^\n]+\n$")

# Names a crafted checkpoint may hold: rich markup that crashed tables (MarkupError) or
# changed what they show, and terminal escape sequences.
CRAFTED = {
    "x[/].weight": (30, 20),
    "[link=http://evil.example]click[/link].weight": (30, 20),
    "esc\x1b[31mred\x07.weight": (30, 20),
    "fc.weight": (40, 30),
}


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a failed run, checked to be exactly one ``htsr: error:`` line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert ERROR_LINE.match(proc.stderr), proc.stderr
    return proc.stderr


def leftovers(directory: Path) -> list[str]:
    """Temporary files htsr may have left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint with crafted layer names, its analysis document and the analysis of a
    plain checkpoint (for the document tests)."""
    d = tmp_path_factory.mktemp("crafted")
    g = torch.Generator().manual_seed(0)
    ckpt = d / "crafted.safetensors"
    save_file({k: torch.randn(*s, generator=g) for k, s in CRAFTED.items()}, ckpt)
    analysis = d / "crafted.json"
    proc = clirunner.run(["analyze", ckpt, "--format", "json", "-o", analysis])
    assert proc.returncode == 0, proc.stderr
    plain = d / "plain.safetensors"
    tensors = {
        "features.0.weight": torch.randn(64, 3, 3, 3, generator=g),
        "features.1.weight": torch.randn(64, 64, 3, 3, generator=g),
        "fc1.weight": torch.randn(128, 256, generator=g),
        "classifier.weight": torch.randn(10, 128, generator=g),
    }
    save_file(tensors, plain)
    plain_json = d / "plain.json"
    proc = clirunner.run(["analyze", plain, "--format", "json", "-o", plain_json])
    assert proc.returncode == 0, proc.stderr
    return {"ckpt": ckpt, "analysis": analysis, "plain": plain, "plain_json": plain_json}


# ------------------------------------------------------------------------------------------
# 2. Strings from files are shown literally, control characters escaped, in every table


def _assert_literal(text: str) -> None:
    assert "x[/]" in text
    assert "[link=http://evil.example]click[/link]" in text  # shown, not turned into a link
    assert "\x1b" not in text and "\x07" not in text  # no raw escape reaches the terminal
    assert "esc\\x1b[31mred\\x07" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{ckpt}", "--format", "table"],
        ["analyze", "{ckpt}", "--format", "table", "--verbose"],
        ["allocate", "{analysis}", "--lr", "0.1", "--format", "table"],
        ["allocate", "{analysis}", "--lr", "0.1", "--format", "table", "--all-layers"],
        ["prune", "{analysis}", "--sparsity", "0.3", "--format", "table"],
        ["prune", "{ckpt}", "--sparsity", "0.3", "--format", "table"],
    ],
    ids=["analyze", "analyze-verbose", "allocate", "allocate-all", "prune-doc", "prune-ckpt"],
)
def test_tables_show_names_literally(crafted: dict[str, Path], argv: list[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in crafted.items()}) for a in argv]
    proc = clirunner.run(args, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    _assert_literal(proc.stdout + proc.stderr)


def test_tables_on_a_terminal_with_colour_show_names_literally(crafted: dict[str, Path]) -> None:
    """Styled output (a terminal, colour on) goes through rich markup too: still literal."""
    from rich.console import Console

    from htsr_cli.allocate.report import render_plan_table
    from htsr_cli.allocate.schemes import allocate
    from htsr_cli.engine.analysis import analyze
    from htsr_cli.engine.report import render_table

    console = Console(record=True, force_terminal=True, width=300, color_system="truecolor")
    render_table(analyze(str(crafted["ckpt"])), console)
    render_plan_table(allocate(str(crafted["analysis"]), lr=0.1), console)
    _assert_literal(console.export_text())


def test_error_lines_escape_control_characters(tmp_path: Path) -> None:
    name = tmp_path / "evil\x1b]0;owned\x07.safetensors"
    proc = clirunner.run(["analyze", name])
    one_error_line(proc)
    assert "\x1b" not in proc.stderr and "\\x1b]0;owned\\x07" in proc.stderr


# ------------------------------------------------------------------------------------------
# 8. Documents are validated fully at the reader: malformed ones are input errors (exit 2)


def _mutated(doc: dict[str, Any], how: str) -> str:
    doc = copy.deepcopy(doc)
    if how == "deep":
        return json.dumps(doc)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    if how == "bigint":
        return json.dumps(doc).replace('"N": ', '"N": ' + "9" * 5000 + ', "_": ', 1)
    if how == "N1e308":
        doc["layers"][0]["N"] = 1e308
    elif how == "skipped-half":
        doc["skipped"] = 0.5
    elif how == "duplicate":
        doc["layers"][1]["name"] = doc["layers"][0]["name"]
    elif how == "duplicate-skipped":
        doc["skipped"] = [{"name": doc["layers"][0]["name"], "reason": "x"}]
    elif how == "name-number":
        doc["layers"][0]["name"] = 7
    elif how == "alpha-string":
        doc["layers"][0]["alpha"] = "2.5"
    elif how == "alpha-list":
        doc["layers"][0]["alpha"] = [2.5]
    elif how == "shape-negative":
        doc["skipped"] = [{"name": "s", "reason": "x", "shape": [-4, 2], "dtype": "float32"}]
    elif how == "layers-object":
        doc["layers"] = {"a": 1}
    elif how == "source-list":
        doc["source"] = []
    return json.dumps(doc)


MALFORMED = [
    "deep",
    "bigint",
    "N1e308",
    "skipped-half",
    "duplicate",
    "duplicate-skipped",
    "name-number",
    "alpha-string",
    "alpha-list",
    "shape-negative",
    "layers-object",
    "source-list",
]


@pytest.mark.parametrize("how", MALFORMED)
@pytest.mark.parametrize(
    "command",
    [["allocate", "-", "--lr", "0.1"], ["prune", "-", "--sparsity", "0.3"]],
    ids=["allocate", "prune"],
)
def test_malformed_analysis_is_an_input_error(
    crafted: dict[str, Path], how: str, command: list[str], tmp_path: Path
) -> None:
    doc = json.loads(crafted["plain_json"].read_text())
    out = tmp_path / "out.json"
    argv = [*command, "--format", "json"] if command[0] == "allocate" else command
    proc = clirunner.run(
        [*argv, "-o", out] if command[0] == "allocate" else argv, stdin=_mutated(doc, how)
    )
    one_error_line(proc)
    assert proc.stdout == "" and not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["deep", "bigint", "N1e308", "skipped-half", "duplicate"])
def test_malformed_analysis_is_an_input_error_for_plot(
    crafted: dict[str, Path], how: str, tmp_path: Path
) -> None:
    doc = json.loads(crafted["plain_json"].read_text())
    src = tmp_path / "a.json"
    src.write_text(_mutated(doc, how))
    out = tmp_path / "fig.png"
    proc = clirunner.run(["plot", "metrics", src, "-o", out])
    one_error_line(proc)
    assert not out.exists() and leftovers(tmp_path) == []


def test_the_reader_accepts_what_analyze_writes(crafted: dict[str, Path]) -> None:
    """The full check refuses nothing htsr itself writes (the crafted names included)."""
    from htsr_cli.io.documents import read_analysis

    for key in ("analysis", "plain_json"):
        doc, _ = read_analysis(crafted[key])
        assert doc["layers"]


# ------------------------------------------------------------------------------------------
# 6. Bounded work: the ww KS scan on a long spectrum, --budget-step


def _spectrum(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if kind == "chi2":  # a 1x1xKxK conv: each eigenvalue is one squared weight, halved
        x = torch.randn(n, generator=g, dtype=torch.float64) ** 2 / 2
    elif kind == "pareto":  # a power law: many candidates with nearly the best D
        x = u ** (-1 / 1.5)
    elif kind == "discrete":  # many equal eigenvalues (ties in D)
        x = torch.randint(1, 20, (n,), generator=g).double()
    else:  # a bulk and a heavy tail
        x = torch.cat(
            [torch.randn(n // 2, generator=g, dtype=torch.float64) ** 2, u[n // 2 :] ** -0.4]
        )
    return torch.sort(x).values


@pytest.mark.parametrize("kind", ["chi2", "pareto", "discrete", "mixture"])
def test_long_spectrum_fit_matches_weightwatcher(kind: str) -> None:
    """Past EXACT_SCAN_ELEMS the scan bounds D instead of evaluating every tail; the fit must
    still be WeightWatcher's own (its WWFit, the argmin-D loop it runs) to rounding."""
    from weightwatcher.WW_powerlaw import WWFit

    from htsr_cli.engine.fit import EXACT_SCAN_ELEMS, fit_power_law

    x = _spectrum(kind, 6000, seed=3)
    x = x[x > 1e-5]
    assert x.numel() ** 2 > EXACT_SCAN_ELEMS  # the bounded path runs
    ours = fit_power_law(x, "ww")
    ref = WWFit(x.numpy())
    assert ours.xmin == pytest.approx(float(ref.xmin), rel=1e-12)
    assert ours.alpha == pytest.approx(float(ref.alpha), rel=1e-10)
    assert ours.D == pytest.approx(float(ref.D), rel=1e-10)


@pytest.mark.parametrize("kind", ["chi2", "pareto", "mixture"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bounded_scan_is_the_plain_scan(kind: str, seed: int) -> None:
    """ks_argmin against the plain quadratic scan (every D_i evaluated): same index, same D."""
    from htsr_cli.engine import fit

    x = _spectrum(kind, 12000 + seed * 999, seed)
    x = x[x > 1e-5]
    logx = torch.log(x)
    alpha = 1 + (x.numel() - torch.arange(x.numel() - 1)) / (
        torch.flip(torch.cumsum(torch.flip(logx, (0,)), 0), (0,))[:-1]
        - (x.numel() - torch.arange(x.numel() - 1)) * logx[:-1]
    )
    idx = torch.arange(x.numel() - 1)
    full = fit._ks_distances(x, logx, alpha, idx)
    k, d = fit.ks_argmin(x, logx, alpha, idx)
    assert k == int(torch.argmin(full)) and d == float(full.min())


def test_a_262144_eigenvalue_conv_is_analysed(tmp_path: Path) -> None:
    """The issue's 1 MB conv (1x1x512x512: 262,144 pooled eigenvalues) took 209 s; the run gets
    a generous bound (a quadratic scan does not come near it) and WeightWatcher's formula
    checked at the chosen xmin."""
    ckpt = tmp_path / "conv.safetensors"
    save_file(
        {"conv.weight": torch.randn(1, 1, 512, 512, generator=torch.Generator().manual_seed(0))},
        ckpt,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "htsr_cli",
            "analyze",
            ckpt,
            "--format",
            "json",
            "--metrics",
            "alpha",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    layer = json.loads(proc.stdout)["layers"][0]
    assert layer["num_evals"] == 512 * 512
    # The MLE at the reported xmin (WeightWatcher's alpha formula, by hand).
    ev = torch.sort(
        torch.randn(1, 1, 512, 512, generator=torch.Generator().manual_seed(0)).double().reshape(-1)
        ** 2
        / 2
    ).values
    tail = ev[ev >= layer["xmin"]]
    assert layer["alpha"] == pytest.approx(
        1 + tail.numel() / float(torch.log(tail / layer["xmin"]).sum()), rel=1e-9
    )


def test_budget_step_is_bounded(crafted: dict[str, Path]) -> None:
    """--budget-step 1e-300 looped ceil(1/step) times; now a bisection, same rule: it equals
    the plain incremental loop on a step small enough to loop over."""
    from htsr_cli.prune.budgets import stepped_counts

    budgets, numel = [0.9, 0.5, 0.2], [1000, 3000, 700]
    for removed in (0, 1, 500, 1234, 2000, 4700):
        step = 0.003
        best, level = [0, 0, 0], 0.0
        t = 1
        while t * step < 0.9 + step:  # the thesis's loop, as written in docs/prune.md
            counts = [int(min(t * step, k) * n + 1e-9) for k, n in zip(budgets, numel, strict=True)]
            if sum(counts) > removed:
                break
            best, level = counts, min(t * step, 0.9)
            t += 1
        got, got_level = stepped_counts(budgets, numel, removed, step)
        assert list(got) == best and got_level == pytest.approx(level)
    proc = clirunner.run(
        [
            "prune",
            crafted["plain_json"],
            "--sparsity",
            "0.3",
            "--budget-step",
            "1e-300",
            "--format",
            "json",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["budget_step"] == 1e-300


# ------------------------------------------------------------------------------------------
# 3, 4 and 7. finetune --resume: a whole run directory, consent for user code, stale temps

USER_ARCH = """
import pathlib
from torch import nn

pathlib.Path(__file__).with_name("imported.marker").touch()  # the code of the module ran


def build(*, num_classes=10, width=1.0, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, num_classes),
    )
"""


@pytest.fixture()
def user_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run of a user architecture (``htsr_user_arch_mod:build``) stopped after epoch 1 of 2."""
    (tmp_path / "htsr_user_arch_mod.py").write_text(USER_ARCH)
    run = tmp_path / "run"
    proc = clirunner.run(
        ["finetune", "--arch", "htsr_user_arch_mod:build", "--data", "digits", "--epochs", "2"]
        + ["--lr", "0.05", "--batch-size", "64", "--stop-after", "1", "-o", run],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    sys.modules.pop("htsr_user_arch_mod", None)  # a later import runs the module again
    marker = tmp_path / "imported.marker"
    assert marker.exists()
    marker.unlink()
    return run, marker


def test_resume_needs_consent_to_import_user_code(user_run: tuple[Path, Path]) -> None:
    run, marker = user_run
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    proc = clirunner.run(["finetune", "--resume", run], cwd=run.parent)
    assert "htsr_user_arch_mod:build" in one_error_line(proc) and "--arch" in proc.stderr
    assert not marker.exists()  # refused before any import
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    other = clirunner.run(["finetune", "--resume", run, "--arch", "resnet18"], cwd=run.parent)
    assert "--arch cannot change" in one_error_line(other) and not marker.exists()
    # The --arch given again is the consent of the first run: the run continues to epoch 2.
    proc = clirunner.run(
        ["finetune", "--resume", run, "--arch", "htsr_user_arch_mod:build"], cwd=run.parent
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and json.loads(proc.stdout)["epochs"] == 2
    sys.modules.pop("htsr_user_arch_mod", None)


def test_resume_refuses_a_run_directory_that_is_not_whole(user_run: tuple[Path, Path]) -> None:
    """state.pt missing beside the epoch's weights and history: resuming used to retrain from
    scratch over them (exit 0); it must refuse and leave every file as it was."""
    run, _ = user_run
    (run / "state.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = clirunner.run(
        ["finetune", "--resume", run, "--arch", "htsr_user_arch_mod:build"], cwd=run.parent
    )
    assert "state.pt" in one_error_line(proc) and "not a whole run" in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    sys.modules.pop("htsr_user_arch_mod", None)


def test_resume_removes_stale_temp_files(user_run: tuple[Path, Path]) -> None:
    """A kill while an epoch was being saved leaves ``.state.pt.XXXX.tmp`` (and the like)."""
    run, _ = user_run
    for name in (".state.pt.abc123.tmp", ".model.safetensors.x_1.tmp", ".history.jsonl.q.tmp"):
        (run / name).write_bytes(b"partial")
    proc = clirunner.run(
        ["finetune", "--resume", run, "--arch", "htsr_user_arch_mod:build"], cwd=run.parent
    )
    assert proc.returncode == 0, proc.stderr
    assert leftovers(run) == []
    sys.modules.pop("htsr_user_arch_mod", None)


# ------------------------------------------------------------------------------------------
# 7. Signals and output errors


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_signals_are_an_interrupt(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM / SIGHUP during analyze: exit 130, the one 'htsr: interrupted' line, and no
    partial ``.report.json.XXXX.tmp`` beside -o (they used to kill it silently, leaving it)."""
    g = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "many.safetensors"
    save_file({f"l{i}.weight": torch.randn(500, 400, generator=g) for i in range(60)}, ckpt)
    target = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "htsr_cli", "analyze", ckpt, "--format", "ndjson", "-o", target]
        + ["--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline  # a layer is being written
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "htsr: interrupted\n" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.safetensors"]


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{ckpt}", "--format", "json", "-o", "/dev/full"],
        ["analyze", "{ckpt}", "--format", "ndjson", "-o", "/dev/full"],
        ["allocate", "{analysis}", "--lr", "0.1", "-o", "/dev/full"],
        ["allocate", "{analysis}", "--lr", "0.1", "--format", "csv", "-o", "/dev/full"],
    ],
)
def test_a_full_device_is_an_input_error(crafted: dict[str, Path], argv: list[str]) -> None:
    """``-o /dev/full`` (a full disk) exited 3, "a bug"; it is the environment: exit 2."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    args = [a.format(**{k: str(v) for k, v in crafted.items()}) for a in argv]
    proc = clirunner.run(args)
    assert "No space left on device" in one_error_line(proc)


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{ckpt}", "--format", "table"],
        ["prune", "{analysis}", "--sparsity", "0.3", "--format", "table"],
    ],
)
def test_a_full_stdout_is_an_input_error(crafted: dict[str, Path], argv: list[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    args = [a.format(**{k: str(v) for k, v in crafted.items()}) for a in argv]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "htsr_cli", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "htsr: error: cannot write stdout: No space left on device\n"


# ------------------------------------------------------------------------------------------
# 5. Shards resolve inside the model directory


def _sharded(d: Path, weight_map: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_shard_outside_the_model_directory_is_refused(tmp_path: Path, how: str) -> None:
    outside = tmp_path / "secret.safetensors"
    save_file({"a.weight": torch.randn(30, 20)}, outside)
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    save_file({"b.weight": torch.randn(30, 20)}, model / "inside.safetensors")
    name = {"dotdot": "../../secret.safetensors", "absolute": str(outside)}.get(
        how, "link.safetensors"
    )
    if how == "symlink":
        (model / name).symlink_to(outside)
    _sharded(model, {"a.weight": name, "b.weight": "inside.safetensors"})
    out = tmp_path / "report.json"
    proc = clirunner.run(["analyze", model, "--format", "json", "-o", out])
    assert "outside the model directory" in one_error_line(proc)
    assert not out.exists() and "secret" not in proc.stdout


def test_hugging_face_cache_links_stay_allowed(tmp_path: Path) -> None:
    """The hub's snapshots/<hash>/ files are links to ../../blobs: still one model."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, key in enumerate(("a.weight", "b.weight")):
        save_file({key: torch.randn(30, 20)}, repo / "blobs" / f"blob{i}")
        (snap / f"model-{i}.safetensors").symlink_to(f"../../blobs/blob{i}")
    _sharded(snap, {"a.weight": "model-0.safetensors", "b.weight": "model-1.safetensors"})
    proc = clirunner.run(["analyze", snap, "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    assert [x["name"] for x in json.loads(proc.stdout)["layers"]] == ["a", "b"]


# ------------------------------------------------------------------------------------------
# 9. Honest messages


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch htsr-pickle-ran",))


def test_a_pickle_that_runs_code_is_named_so(tmp_path: Path) -> None:
    """torch 2.13 refuses it as 'unsupported GLOBAL ... blocked'; htsr said 'corrupt'."""
    ckpt = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.randn(30, 20), "x": _RunsCode()}, ckpt)
    proc = clirunner.run(["analyze", ckpt], cwd=tmp_path)
    line = one_error_line(proc)
    assert "needs arbitrary code to unpickle" in line and "--trust-pickle" in line
    assert "corrupt" not in line and not (tmp_path / "htsr-pickle-ran").exists()


def test_a_finite_weight_whose_gram_overflows_is_not_called_nan(tmp_path: Path) -> None:
    ckpt = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    big = torch.randn(30, 20, generator=g, dtype=torch.float64) * 1e200
    save_file({"big.weight": big, "ok.weight": torch.randn(30, 20, dtype=torch.float64)}, ckpt)
    proc = clirunner.run(["analyze", ckpt, "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    (skipped,) = json.loads(proc.stdout)["skipped"]
    assert skipped["name"] == "big" and "NaN" not in skipped["reason"]
    assert "overflow" in skipped["reason"] and f"{float(big.abs().max()):.3g}" in skipped["reason"]


def test_a_plan_never_holds_a_non_finite_number(crafted: dict[str, Path], tmp_path: Path) -> None:
    """--lr 1e308 --s2 1e308 wrote "lr": null at exit 0."""
    out = tmp_path / "plan.json"
    proc = clirunner.run(
        ["allocate", crafted["plain_json"], "--lr", "1e308", "--s2", "1e308", "--all-layers"]
        + ["-o", out]
    )
    assert "not a finite number" in one_error_line(proc) and not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{fifo}.safetensors"],
        ["allocate", "{fifo}.json", "--lr", "0.1"],
        ["prune", "{fifo}.json", "--sparsity", "0.5"],
        ["plot", "metrics", "{fifo}.json", "-o", "{dir}/fig.png"],
    ],
    ids=["analyze", "allocate", "prune", "plot"],
)
def test_a_fifo_is_refused_as_an_input(tmp_path: Path, argv: list[str]) -> None:
    """open() of a FIFO blocks until a writer comes: it used to hang."""
    for ext in (".safetensors", ".json"):
        os.mkfifo(tmp_path / f"fifo{ext}")
    args = [a.format(fifo=tmp_path / "fifo", dir=tmp_path) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "htsr_cli", *args], capture_output=True, text=True, timeout=60
    )
    assert "not a regular file" in one_error_line(proc)


def test_outputs_to_special_files_stay_allowed(crafted: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "htsr_cli", "analyze", crafted["plain"], "--format", "json"]
        + ["-o", "/dev/stdout"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema"] == "htsr.analysis/1"


def test_library_warnings_do_not_break_the_one_line_error(tmp_path: Path) -> None:
    """numpy warns 'overflow encountered in matmul' on the way to this error (the Gram of a
    1e200 weight): stderr must still be the one error line (HTSR_DEBUG=1 shows warnings)."""
    ckpt = tmp_path / "big.safetensors"
    save_file({"big.weight": torch.randn(30, 20, dtype=torch.float64) * 1e200}, ckpt)
    cmd = [sys.executable, "-m", "htsr_cli", "allocate", str(ckpt), "--lr", "0.1"]
    env = {k: v for k, v in os.environ.items() if k != "HTSR_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert "no layer could be analysed" in one_error_line(proc)
    debug = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**env, "HTSR_DEBUG": "1"}
    )
    assert "RuntimeWarning" in debug.stderr  # the warning is real; htsr only hides it


@pytest.mark.parametrize("kind", ["lr-plan", "prune-plan"])
@pytest.mark.parametrize("how", ["duplicate", "name-number", "metric-list", "deep"])
def test_malformed_plans_are_input_errors(
    crafted: dict[str, Path], tmp_path: Path, kind: str, how: str
) -> None:
    """A prune plan naming a layer twice crashed ``plot prune-plan`` (exit 3, found by the
    document fuzzer); the plans are checked fully at their one reader too."""
    make = (
        ["allocate", crafted["plain_json"], "--lr", "0.1", "--format", "json"]
        if kind == "lr-plan"
        else ["prune", crafted["plain_json"], "--sparsity", "0.3", "--format", "json"]
    )
    proc = clirunner.run(make)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    if how == "duplicate":
        doc["layers"].append(copy.deepcopy(doc["layers"][0]))
    elif how == "name-number":
        doc["layers"][0]["name"] = 3
    elif how == "metric-list":
        doc["layers"][0]["metric_value"] = [1.0]
    src = tmp_path / "plan.json"
    text = json.dumps(doc)
    src.write_text(
        text[:-1] + ', "x": ' + "[" * 10_000 + "]" * 10_000 + "}" if how == "deep" else text
    )
    out = tmp_path / "fig.png"
    one_error_line(clirunner.run(["plot", kind, src, "-o", out]))
    assert not out.exists() and leftovers(tmp_path) == []
    if kind == "prune-plan":
        one_error_line(clirunner.run(["prune", crafted["plain"], "--plan", src]))
