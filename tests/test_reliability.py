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
import subprocess
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
        ["prune", "{analysis}", "--sparsity", "0.3"],
        ["prune", "{ckpt}", "--sparsity", "0.3"],
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
    elif how == "alpha-huge":
        doc["layers"][0]["alpha"] = 1e300
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
    "alpha-huge",
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
