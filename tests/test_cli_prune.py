"""End-to-end tests of ``htsr prune``: real subprocesses, a real shell pipe, real files.

Contract (docs/prune.md): the plan on stdout (a table, or ``--format json``), the pruned
checkpoint with ``-o``; exit 2 with exactly one ``htsr: error:`` line for bad input and
nothing written. Subprocesses run together (they are ~1.5 s each); the other error cases go
through the same entry point in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import clirunner
import pytest
import torch
from safetensors import safe_open

from htsr_cli.cli import main
from htsr_cli.finetune.data import default_checkpoint, load_digits
from htsr_cli.prune import load_pruned_model, read_prune_record

TIMEOUT = 180
CKPT = str(default_checkpoint())

# A user architecture with the digits CNN's layout and parameter names (scripts/
# train_default.py), so that --arch module:function can rebuild the built-in checkpoint.
FACTORY = textwrap.dedent("""
    from collections import OrderedDict

    from torch import nn


    def digits_cnn(num_classes: int = 10) -> nn.Module:
        features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2))
        classifier = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2),
                                   nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))
        return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(),
                                         classifier=classifier))


    digits_cnn.input_size = (1, 8, 8)
""")


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def htsr(*args: Any, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    """``htsr ARGS`` through the real CLI entry point, in process (clirunner)."""
    return clirunner.run(list(args), env=_env(), cwd=cwd)


def shell(command: str, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, shell=True, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=TIMEOUT
    )


def strict_json(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON constant {token!r}")

    return json.loads(text, parse_constant=refuse)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "htsr: error" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every subprocess of this module, started together."""
    tmp = tmp_path_factory.mktemp("cli-prune")
    (tmp / "digits_arch.py").write_text(FACTORY)
    q = f"'{CKPT}'"
    calls = {
        "json": (
            htsr,
            ("prune", CKPT, "--sparsity", "0.5", "--format", "json", "-o", tmp / "u.safetensors"),
            {},
        ),
        "pipe": (
            shell,
            (
                f"{sys.executable} -m htsr_cli analyze {q} --format json | "
                f"{sys.executable} -m htsr_cli prune - --sparsity 0.3 --method erk "
                "--format json",
            ),
            {},
        ),
        "structured": (
            htsr,
            (
                "prune",
                CKPT,
                "--structured",
                "--arch",
                "digits_arch:digits_cnn",
                "--sparsity",
                "0.5",
                "--importance",
                "l1",
                "--format",
                "table",
                "-o",
                tmp / "s.safetensors",
            ),
            {"cwd": tmp},
        ),
        "bad": (htsr, ("prune", CKPT, "--sparsity", "1.5", "-o", tmp / "bad.safetensors"), {}),
    }
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {k: pool.submit(f, *a, **kw) for k, (f, a, kw) in calls.items()}
        out = {k: fut.result() for k, fut in futures.items()}
    out["tmp"] = tmp
    return out


def test_json_plan_and_unstructured_checkpoint(runs):
    proc = runs["json"]
    assert_ok(proc)
    doc = strict_json(proc.stdout)  # stdout is the plan and nothing else
    assert doc["schema"] == "htsr.prune-plan/1" and doc["mode"] == "unstructured"
    assert doc["method"] == "metric" and doc["metric"] == "alpha"
    assert doc["achieved"]["removed"] == doc["target"]["removed"]
    assert doc["target"]["params_before"] == 256288  # 288+18432+73728+131072+32768
    out = runs["tmp"] / "u.safetensors"
    assert doc["output"] == str(out) and "wrote" in proc.stderr
    with safe_open(str(out), "pt") as f:
        for layer in doc["layers"]:
            w = f.get_tensor(layer["name"] + ".weight")
            assert int((w == 0).sum()) == layer["params_before"] - layer["params_after"]
            assert layer["ratio"] == pytest.approx(float((w == 0).float().mean()))
    assert read_prune_record(out)["mode"] == "unstructured"


def test_plan_from_an_analysis_on_stdin(runs):
    proc = runs["pipe"]
    assert_ok(proc)
    doc = strict_json(proc.stdout)
    assert doc["source"]["analysis"] == "stdin" and doc["method"] == "erk"
    assert doc["metric"] is None and doc["groups"] == []
    assert abs(doc["achieved"]["sparsity"] - 0.3) < 1e-5
    assert {x["name"] for x in doc["layers"]} == {
        "features.0",
        "features.2",
        "features.6",
        "classifier.0",
        "classifier.3",
    }


def test_structured_with_a_user_arch_and_its_table(runs):
    proc = runs["structured"]
    assert_ok(proc)
    table = proc.stdout
    assert "requested: remove 128,144 of 256,288" in table
    assert "achieved:" in table and "MACs:" in table
    assert "layer 'classifier.5' is the classifier: never pruned" in table
    out = runs["tmp"] / "s.safetensors"
    assert f"wrote {out}" in table
    record = read_prune_record(out)
    assert record["arch"] == "digits_arch:digits_cnn" and record["history"]
    kept = record["achieved"]["params_after"]
    assert abs(kept - 128144) <= 0.005 * 128144
    sys.path.insert(0, str(runs["tmp"]))  # where the user's module lives
    try:
        model = load_pruned_model(out)
    finally:
        sys.path.remove(str(runs["tmp"]))
    x, y = load_digits("test")
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(y), 10)
    assert model.features[0].out_channels < 32  # channels really removed


def test_out_of_range_sparsity_is_one_line_and_writes_nothing(runs):
    proc = runs["bad"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsr: error: --sparsity must be in [0, 1)")
    assert proc.stdout == "" and not (runs["tmp"] / "bad.safetensors").exists()


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsr: error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "0.5", "--method", "magnitude"], "unknown method 'magnitude'"),
        (["--sparsity", "0.5", "--metric", "alfa"], "unknown metric 'alfa'"),
        (["--sparsity", "0.5", "--structured"], "needs --arch"),
        (["--sparsity", "0.5", "--structured", "--arch", "resnet7"], "unknown arch 'resnet7'"),
        (
            ["--sparsity", "0.5", "--structured", "--arch", "not_a_module_abc:build"],
            "cannot import",
        ),
        (["--sparsity", "0.5", "--format", "csv"], "unknown --format 'csv'"),
        (["--sparsity", "0.5", "--eps", "1.5"], "--eps must be in [0, 1)"),
        (["--sparsity", "0.5", "--structured", "--unstructured"], "choose one of"),
        (["--keep-params", "999999999"], "--keep-params must be an integer"),
        (
            ["--sparsity", "0.5", "--unstructured", "--arch", "resnet18"],
            "its classifier 'fc' is not a layer of",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, args, needle):
    assert needle in _error(capsys, CKPT, *args)


def test_a_plan_with_a_malformed_target_names_the_target(capsys, tmp_path):
    plan = {
        "schema": "htsr.prune-plan/1",
        "method": "uniform",
        "target": {"sparsity": "half"},
        "layers": [{"name": "features.2", "budget": 0.5}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    line = _error(capsys, CKPT, "--plan", str(path))
    assert "target.sparsity must be a number in [0, 1), got 'half'" in line


def test_a_plan_naming_layers_the_model_lacks(capsys, tmp_path):
    plan = {
        "schema": "htsr.prune-plan/1",
        "method": "uniform",
        "target": {"sparsity": 0.5},
        "layers": [{"name": "encoder.block.0", "budget": 0.5}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out = tmp_path / "out.safetensors"
    line = _error(capsys, CKPT, "--plan", str(path), "-o", str(out))
    assert "'encoder.block.0' is not a layer of the model" in line
    assert not out.exists()


def test_the_table_format_and_the_input_is_untouched(capsys, tmp_path):
    # A table when asked (the default only on a terminal: tests/test_first_hour.py).
    before = Path(CKPT).read_bytes()
    main_ok = ["prune", CKPT, "--keep-params", "100000", "--method", "uniform", "-f", "table"]
    with pytest.raises(SystemExit) as exit_info:
        main(main_ok)
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert "requested: remove 156,288 of 256,288" in captured.out
    assert "achieved:  removed 156,288" in captured.out
    assert Path(CKPT).read_bytes() == before
