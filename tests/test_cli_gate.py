"""``htsr gate``, ``htsr diff`` and ``htsr plot diff`` end to end (issue 11; issue 15 finding 1).

Reports are real: the built-in demo checkpoint analysed once, and copies of its report with a
few values changed by hand (the oracle: the change we made). Every output format is parsed
back (JSON with json, JUnit with junitparser, GitHub workflow commands and Markdown by their
grammar). CLI cases run in process (tests/clirunner.py); the torch-free check runs in a
subprocess, where ``sys.modules`` starts clean.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import clirunner
import numpy as np
import pytest
import torch
from junitparser import Failure, JUnitXml
from safetensors.torch import save_file

METRICS = "alpha,stable_rank,spectral_norm"  # canonical order
CHANGED = {"features.2": 0.5, "classifier.3": -0.4}  # alpha deltas we put into the copy


def run(*argv, **kw):
    return clirunner.run(list(argv), **kw)


def one_error_line(proc) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("htsr: error: "), lines[0]
    return lines[0]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """base.json: the demo checkpoint's analysis; new.json: a copy with two alphas moved, a
    layer renamed (one added, one removed) and a layer skipped for NaN weights."""
    d = tmp_path_factory.mktemp("gate")
    base = d / "base.json"
    proc = run("analyze", "--metrics", METRICS, "--format", "json", "-o", base)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(base.read_text())
    new = copy.deepcopy(doc)
    for layer in new["layers"]:
        if layer["name"] in CHANGED:
            layer["alpha"] += CHANGED[layer["name"]]
    new["layers"][-1]["name"] = "head.renamed"
    new["skipped"].append(
        {"name": "diverged.fc", "reason": "weight has NaN or infinite entries", "nonfinite": True}
    )
    (d / "new.json").write_text(json.dumps(new))
    same = copy.deepcopy(doc)
    for layer in same["layers"]:
        if layer["name"] in CHANGED:
            layer["alpha"] += CHANGED[layer["name"]]
    (d / "same_names.json").write_text(json.dumps(same))
    return {
        "dir": d,
        "base": base,
        "new": d / "new.json",
        "same": d / "same_names.json",
        "doc": doc,
    }


GATES = (
    "--fail-if", "delta(alpha) > 0.2",
    "--fail-if", "mean(delta(alpha)) > 1",
    "--fail-if", "max(ratio(spectral_norm)) > 1.5 on 'features.*'",
    "--fail-if", "added > 0",
)  # fmt: skip


def test_json_report_names_exactly_the_changed_layers(reports):
    proc = run("gate", reports["same"], "--baseline", reports["base"], *GATES, "-f", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "htsr.gate-report/1" and doc["passed"] is False
    delta, mean, ratio, added = doc["gates"]
    assert [o["name"] for o in delta["offending"]] == ["features.2"]  # +0.5 > 0.2; -0.4 is not
    assert delta["offending"][0]["value"] == pytest.approx(0.5)
    n = len(reports["doc"]["layers"])
    assert mean["passed"] and mean["value"] == pytest.approx((0.5 - 0.4) / n)
    assert ratio["passed"] and ratio["value"] == pytest.approx(1.0)
    assert added["passed"] and doc["added"] == [] and doc["removed"] == []
    assert proc.stderr == ""


def test_layers_on_one_side_and_diverged_layers_are_listed_and_gated(reports):
    proc = run("gate", reports["new"], "--baseline", reports["base"], *GATES, "-f", "json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    last = reports["doc"]["layers"][-1]["name"]
    assert doc["added"] == ["head.renamed", "diverged.fc"] and doc["removed"] == [last]
    assert doc["nonfinite"] == ["diverged.fc"]
    delta, mean, _, added = doc["gates"]
    assert [o["name"] for o in delta["offending"]] == ["features.2", "diverged.fc"]
    assert not mean["passed"]  # the diverged layer fails the aggregate too
    assert [o["name"] for o in added["offending"]] == ["head.renamed", "diverged.fc"]


def test_junit_report_read_by_junitparser(reports, tmp_path):
    out = tmp_path / "gates.xml"
    proc = run("gate", reports["new"], "--baseline", reports["base"], *GATES, "-o", out)
    assert proc.returncode == 1
    assert "htsr gate: FAILED, 3 of 4 gates" in proc.stderr  # the verdict still reaches the log
    xml = JUnitXml.fromfile(str(out))
    suites = list(xml)
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.tests, suite.failures, suite.errors) == (4, 3, 0)
    cases = {case.name: case for case in suite}
    assert list(cases) == [GATES[i] for i in range(1, 8, 2)]
    failure = [r for r in cases["delta(alpha) > 0.2"].result if isinstance(r, Failure)]
    assert len(failure) == 1
    assert failure[0].text.splitlines() == [
        "features.2: 0.5",
        "diverged.fc: weights are NaN or infinite",
    ]
    assert "FAIL delta(alpha) > 0.2" in failure[0].message
    assert cases["max(ratio(spectral_norm)) > 1.5 on 'features.*'"].is_passed
    assert leftovers(tmp_path) == []


GH = re.compile(r"^::(error|warning|notice) title=([^:]*)::(.*)$")


def _gh_unescape(text: str) -> str:
    return (
        text.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%3A", ":")
        .replace("%2C", ",")
        .replace("%25", "%")
    )


def test_github_commands_one_error_per_failing_gate_and_layer(reports, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    proc = run("gate", reports["new"], "--baseline", reports["base"], *GATES, "-f", "github",
               env=env)  # fmt: skip
    assert proc.returncode == 1
    commands = [GH.match(line) for line in proc.stdout.splitlines()]
    errors = [
        (_gh_unescape(m.group(2)), _gh_unescape(m.group(3)))
        for m in commands
        if m and m.group(1) == "error"
    ]
    assert errors == [
        ("htsr gate: delta(alpha) > 0.2", "features.2: value 0.5"),
        ("htsr gate: delta(alpha) > 0.2", "diverged.fc: weights are NaN or infinite"),
        ("htsr gate: mean(delta(alpha)) > 1", "diverged.fc: weights are NaN or infinite"),
        ("htsr gate: added > 0", "head.renamed: value -"),
        ("htsr gate: added > 0", "diverged.fc: value -"),
    ]
    # The passing gate is a plain log line, not a command.
    assert any(line.startswith("ok   max(ratio") for line in proc.stdout.splitlines())
    text = summary.read_text()
    assert text.startswith("earlier step\n### htsr gate: FAILED, 3 of 4 gates")


def test_github_escapes_names_so_a_name_cannot_inject_a_command(reports, tmp_path):
    doc = json.loads(reports["same"].read_text())
    doc["layers"][0]["name"] = "evil\n::error::injected,%0A"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(doc))
    proc = run("gate", path, "--fail-if", "alpha > 0", "-f", "github")
    assert proc.returncode == 1
    assert not any(line.startswith("::error::") for line in proc.stdout.splitlines())
    assert all(GH.match(ln) or not ln.startswith("::") for ln in proc.stdout.splitlines())


def _markdown_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| result"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_markdown_table_parsed_back(reports):
    doc = json.loads(reports["same"].read_text())
    doc["layers"][1]["name"] = "pipe|name"
    proc = run("gate", "-", "--fail-if", "alpha > 0 on 'pipe*'", "--fail-if", "mean(alpha) > 99",
               "-f", "markdown", stdin=json.dumps(doc))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("### htsr gate: FAILED, 1 of 2 gates\n")
    rows = _markdown_rows(proc.stdout)
    assert rows[0][0] == "❌ FAIL" and rows[0][1] == "`alpha > 0 on 'pipe*'`"
    alpha = doc["layers"][1]["alpha"]
    assert rows[0][3] == f"`pipe|name` ({alpha:.4g})"
    assert rows[1][0] == "✅ ok" and float(rows[1][2]) == pytest.approx(
        np.mean([x["alpha"] for x in doc["layers"]]), rel=1e-3
    )


def test_text_format_and_exit_0_against_itself(reports):
    proc = run("gate", reports["base"], "--baseline", reports["base"], *GATES, "-f", "text")
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert [ln[:4] for ln in lines[:4]] == ["ok  "] * 4
    assert lines[-1] == "htsr gate: passed, 4 of 4 gates"


def test_output_format_from_the_extension(reports, tmp_path):
    for name, check in (
        ("r.json", lambda t: json.loads(t)["schema"] == "htsr.gate-report/1"),
        ("r.xml", lambda t: t.startswith('<?xml version="1.0" encoding="UTF-8"?>')),
        ("r.md", lambda t: t.startswith("### htsr gate")),
        ("r.txt", lambda t: t.endswith("htsr gate: passed, 1 of 1 gates\n")),
    ):
        proc = run("gate", reports["base"], "--fail-if", "alpha > 100", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        assert check((tmp_path / name).read_text()), name


def test_gate_and_analyze_formats_follow_their_rules_through_the_one_function(reports):
    """gate and analyze choose by the one rule (io.output.choose_format), each with its own
    extensions, terminal default and error text (docs/gates.md, docs of analyze)."""
    from htsr_cli.engine.report import choose_format as analyze_format
    from htsr_cli.errors import InputError
    from htsr_cli.gate.run import choose_format as gate_format

    for output, tty, gate, analyze in (
        ("r.json", True, "json", "json"),
        ("r.XML", True, "junit", "json"),
        ("r.md", False, "markdown", "json"),
        ("r.txt", True, "text", "table"),
        ("r.csv", True, "json", "csv"),
        ("r.jsonl", True, "json", "ndjson"),
        ("r.ndjson", False, "json", "ndjson"),
        ("r", True, "json", "json"),
        (None, True, "text", "table"),
        ("-", True, "text", "table"),
        (None, False, "json", "json"),
        ("-", False, "json", "json"),
    ):
        assert gate_format(None, output, tty) == gate, output
        assert analyze_format(None, output, tty) == analyze, output
    assert gate_format("github", "r.json", False) == "github"  # --format wins over -o
    assert analyze_format("csv", "r.json", True) == "csv"
    with pytest.raises(InputError) as exc:
        gate_format("table", None, True)
    assert str(exc.value) == (
        "unknown --format 'table'; choose from text, json, github, junit, markdown"
    )
    with pytest.raises(InputError) as exc:
        analyze_format("junit", "r.xml", True)
    assert str(exc.value) == "unknown --format 'junit'; choose from table, json, csv, ndjson"
    proc = run("gate", reports["base"], "--fail-if", "alpha > 1", "--no-config", "-f", "yaml")
    assert proc.returncode == 2 and one_error_line(proc) == (
        "htsr: error: unknown --format 'yaml'; choose from text, json, github, junit, markdown"
    )


# ------------------------------------------------------------------ bad input: exit 2


def _bad_cases(r: dict, d: Path) -> dict:
    other = json.loads(r["base"].read_text())
    other["schema"] = "htsr.analysis/2"
    (d / "v2.json").write_text(json.dumps(other))
    unrelated = json.loads(r["base"].read_text())
    for layer in unrelated["layers"]:
        layer["name"] = "other." + layer["name"]
    (d / "unrelated.json").write_text(json.dumps(unrelated))
    b = str(r["base"])
    return {
        "malformed": (b, "--fail-if", "alpha >> 6"),
        "unknown-delta-metric": (b, "--baseline", b, "--fail-if", "delta(alphaa) > 1"),
        "delta-without-baseline": (b, "--fail-if", "delta(alpha) > 1"),
        "baseline-other-version": (b, "--baseline", d / "v2.json", "--fail-if", "alpha > 1"),
        "no-layer-in-common": (b, "--baseline", d / "unrelated.json", "--fail-if", "added > 0"),
        "strict-glob": (b, "--strict", "--fail-if", "alpha > 6 on 'nothing.*'"),
        "no-gate": (b,),
        "stdin-twice": ("-", "--baseline", "-", "--fail-if", "alpha > 1"),
        "metric-not-computed": (b, "--fail-if", "entropy > 1"),
        "bad-format": (b, "--fail-if", "alpha > 1", "-f", "yaml"),
        "missing-source": (d / "missing.json", "--fail-if", "alpha > 1"),
        "python-expression": (b, "--fail-if", "__import__('os').system('true') > 0"),
        "no-source": ("--fail-if", "alpha > 1"),
    }


def test_bad_input_is_one_line_exit_2_and_no_output(reports, tmp_path):
    for name, argv in _bad_cases(reports, tmp_path).items():
        out = tmp_path / f"{name}.json"
        proc = run("gate", *argv, "--no-config", "-o", out, stdin="{}")
        assert proc.returncode == 2, (name, proc.stderr)
        one_error_line(proc)
        assert not out.exists(), name
        assert proc.stdout == "", name
    assert leftovers(tmp_path) == []


def test_no_common_layer_message(reports, tmp_path):
    cases = _bad_cases(reports, tmp_path)
    proc = run("gate", *cases["no-layer-in-common"])
    assert "have no layer name in common" in one_error_line(proc)


# ------------------------------------------------------------------ configuration


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pyproject_found_from_a_subdirectory_and_command_line_adds(reports, tmp_path):
    repo = tmp_path / "repo"
    _write(
        repo / "pyproject.toml",
        '[project]\nname = "x"\n\n[tool.htsr.gate]\n'
        'fail-if = ["delta(alpha) > 0.2"]\n'
        f'baseline = "{os.path.relpath(reports["base"], repo)}"\n',
    )
    sub = repo / "models" / "deep"
    sub.mkdir(parents=True)
    proc = run("gate", reports["same"], "-f", "json", cwd=sub)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"]["file"] == str((repo / "pyproject.toml").resolve())
    assert [g["gate"] for g in doc["gates"]] == ["delta(alpha) > 0.2"]
    assert [o["name"] for o in doc["gates"][0]["offending"]] == ["features.2"]
    proc = run("gate", reports["same"], "-f", "json", "--fail-if", "alpha > 100", cwd=sub)
    assert [g["gate"] for g in json.loads(proc.stdout)["gates"]] == [
        "delta(alpha) > 0.2",
        "alpha > 100",
    ]
    # --baseline overrides the file's: against itself nothing changed.
    proc = run("gate", reports["same"], "--baseline", reports["same"], cwd=sub, stdin="")
    assert proc.returncode == 0, proc.stderr
    # --no-config: no gate left.
    proc = run("gate", reports["same"], "--no-config", cwd=sub)
    assert proc.returncode == 2 and "no gate to check" in one_error_line(proc)


def test_htsr_toml_wins_in_its_directory_and_pyproject_without_table_is_passed_over(
    reports, tmp_path
):
    top = tmp_path / "top"
    _write(top / "htsr.toml", '[gate]\nfail-if = ["alpha > 100"]\nstrict = true\n')
    _write(top / "pyproject.toml", '[tool.htsr.gate]\nfail-if = ["alpha > 0"]\n')
    _write(top / "sub" / "pyproject.toml", '[project]\nname = "no-gates-here"\n')
    proc = run("gate", "--show-config", cwd=top / "sub")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0] == f"config: {(top / 'htsr.toml').resolve()} [gate]"
    assert lines[2].split()[:3] == ["alpha", ">", "100"]
    assert lines[-1].startswith("strict: true") and "htsr.toml [gate]" in lines[-1]
    proc = run("gate", "--show-config", "-f", "json", "--no-strict", "--fail-if", "N > 1",
               cwd=top / "sub")  # fmt: skip
    shown = json.loads(proc.stdout)
    assert shown["strict"] is False and shown["origin"]["strict"] == "command line"
    assert [g["from"] for g in shown["fail_if"]] == ["htsr.toml [gate]", "command line"]
    # strict from the file: a glob matching nothing is an error.
    proc = run("gate", reports["base"], "--fail-if", "alpha > 6 on zzz", cwd=top)
    assert proc.returncode == 2 and "(--strict)" in one_error_line(proc)
    proc = run("gate", reports["base"], "--fail-if", "alpha > 6 on zzz", "--no-strict", cwd=top)
    assert proc.returncode == 0
    assert "htsr: warning: --fail-if 'alpha > 6 on zzz': no layer matches 'zzz'" in proc.stderr


@pytest.mark.parametrize(
    ("name", "text", "hint"),
    [
        ("pyproject.toml", "[tool.htsr.gate\nfail-if = 1", "is not valid TOML"),
        ("pyproject.toml", '[tool.htsr.gate]\nfail_if = ["alpha > 6"]\n', "unknown key 'fail_if'"),
        ("htsr.toml", 'fail-if = ["alpha > 6"]\n', "unknown key 'fail-if'"),
        ("htsr.toml", "[gate]\nfail-if = [1]\n", "fail-if must be a list of strings"),
        ("htsr.toml", '[gate]\nstrict = "yes"\n', "strict must be true or false"),
        ("htsr.toml", "[gate]\nbaseline = 3\n", "baseline must be a string"),
        ("htsr.toml", '[gate]\nfail-if = ["alpha >> 6"]\n', "malformed --fail-if"),
        ("htsr.toml", "[gate]\nx = " + "[" * 5000 + "]" * 5000 + "\n", "htsr.toml"),
    ],
)
def test_bad_config_is_one_line_exit_2(reports, tmp_path, name, text, hint):
    _write(tmp_path / name, text)
    out = tmp_path / "out.json"
    proc = run("gate", reports["base"], "--fail-if", "alpha > 6", "-o", out, cwd=tmp_path)
    assert proc.returncode == 2
    assert hint in one_error_line(proc)
    assert not out.exists() and leftovers(tmp_path) == []
    assert run("gate", reports["base"], "--fail-if", "alpha > 100", "--no-config",
               cwd=tmp_path).returncode == 0  # fmt: skip


# ------------------------------------------------------------------ torch-free, no spectrum

_PROBE = """
import json, sys
from htsr_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "spectrum": "htsr_cli.engine.spectrum" in sys.modules,
                  "analysis": "htsr_cli.engine.analysis" in sys.modules}), file=sys.stderr)
"""


def test_gating_a_stored_report_imports_no_torch_and_computes_no_spectrum(reports, tmp_path):
    argv = [reports["same"], "--baseline", reports["base"], "--fail-if", "delta(alpha) > 0.2",
            "-f", "junit", "-o", tmp_path / "j.xml"]  # fmt: skip
    for command in (["gate", *argv], ["diff", reports["base"], reports["same"], "-f", "csv"]):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, *map(str, command)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        probe = json.loads(proc.stderr.splitlines()[-1])
        assert probe == {"code": 1 if command[0] == "gate" else 0, "torch": False,
                         "spectrum": False, "analysis": False}, (command, proc.stderr)  # fmt: skip


# ------------------------------------------------------------------ diverged models (15.1)


def _nan_checkpoint(path: Path, all_layers: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {f"l{i}.weight": torch.randn(64, 48, generator=g) for i in range(3)}
    for i in range(3 if all_layers else 1):
        tensors[f"l{i}.weight"][5, 7] = math.nan
    save_file(tensors, str(path))
    return path


def test_a_diverged_model_fails_the_gates_docs_recommend(tmp_path):
    ckpt = _nan_checkpoint(tmp_path / "diverged.safetensors", all_layers=True)
    # 0.1 passed every gate with "no layers", this one included.
    proc = run("analyze", ckpt, "--metrics", "alpha", "--fail-if", "count(alpha > 0) < 10",
               "--format", "json")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "all 3 selected layers were skipped" in proc.stderr
    doc = json.loads(proc.stdout)
    assert [s.get("nonfinite") for s in doc["skipped"]] == [True, True, True]
    report = tmp_path / "diverged.json"
    report.write_text(proc.stdout)
    for gate in ("alpha > 6", "count(nonfinite) > 0", "mean(alpha) < 0"):
        proc = run("gate", report, "--fail-if", gate, "-f", "json")
        assert proc.returncode == 1, (gate, proc.stderr)
        assert json.loads(proc.stdout)["nonfinite"] == ["l0", "l1", "l2"]
    proc = run("gate", ckpt, "--fail-if", "alpha > 6", "-f", "text")
    assert proc.returncode == 1 and "l0, l1, l2" in proc.stdout


def test_one_diverged_layer_is_visible_to_gates(tmp_path):
    ckpt = _nan_checkpoint(tmp_path / "one.safetensors", all_layers=False)
    proc = run("gate", ckpt, "--fail-if", "count(nonfinite) > 0", "-f", "json")
    assert proc.returncode == 1
    gate = json.loads(proc.stdout)["gates"][0]
    assert gate["value"] == 1 and [o["name"] for o in gate["offending"]] == ["l0"]
    assert run("gate", ckpt, "--fail-if", "alpha > 100 on 'l[12]'").returncode == 0


# ------------------------------------------------------------------ htsr diff, plot diff


def test_diff_json_csv_and_table_against_the_documents(reports, tmp_path):
    base, new = reports["doc"], json.loads(reports["new"].read_text())
    proc = run("diff", reports["base"], reports["new"], "-f", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "htsr.diff/1" and doc["metrics"] == METRICS.split(",")
    by_name_a = {x["name"]: x for x in base["layers"]}
    by_name_b = {x["name"]: x for x in new["layers"]}
    common = [n for n in by_name_b if n in by_name_a]
    assert [x["name"] for x in doc["layers"]] == common
    for row in doc["layers"]:
        for m in doc["metrics"]:
            a, b = by_name_a[row["name"]][m], by_name_b[row["name"]][m]
            assert row["delta"][m] == pytest.approx(b - a)
            assert row["ratio"][m] == pytest.approx(b / a)
    assert doc["added"] == ["head.renamed", "diverged.fc"]
    assert doc["removed"] == [base["layers"][-1]["name"]]

    out = tmp_path / "d.csv"
    assert run("diff", reports["base"], reports["new"], "-o", out).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["name"] for r in rows] == [*common, "head.renamed", "diverged.fc", doc["removed"][0]]
    assert [r["status"] for r in rows][-3:] == ["added", "added", "removed"]
    f2 = next(r for r in rows if r["name"] == "features.2")
    assert float(f2["alpha_delta"]) == pytest.approx(0.5)
    assert float(f2["alpha_b"]) == pytest.approx(by_name_b["features.2"]["alpha"])

    proc = run("diff", reports["base"], reports["new"], "-f", "table", "--metrics", "alpha")
    assert proc.returncode == 0
    table = proc.stdout
    assert "Δalpha" in table and "+0.500" in table and "-0.400" in table
    assert "only in B (added): head.renamed" in table


def test_diff_bad_input(reports, tmp_path):
    proc = run("diff", reports["base"], reports["new"], "--metrics", "entropy")
    assert proc.returncode == 2 and "has no 'entropy' values" in one_error_line(proc)
    proc = run("diff", reports["base"], tmp_path / "nope.json")
    assert proc.returncode == 2
    one_error_line(proc)


def test_plot_diff_draws_the_document_values(reports, tmp_path):
    from htsr_cli.plotting.diff import plot_diff

    out = tmp_path / "diff.svg"
    result = plot_diff(str(reports["base"]), str(reports["new"]), out)
    assert out.read_text().lstrip().startswith("<?xml")
    base, new = reports["doc"], json.loads(reports["new"].read_text())
    a = {x["name"]: x["alpha"] for x in base["layers"]}
    b = {x["name"]: x["alpha"] for x in new["layers"]}
    common = [n for n in b if n in a]
    assert result.layers == [*common, "head.renamed", "diverged.fc", base["layers"][-1]["name"]]
    for i, n in enumerate(common):
        assert result.change[i] == pytest.approx(b[n] - a[n])
    assert np.isnan(result.change[len(common) :]).all()
    assert result.b[len(common)] == pytest.approx(b["head.renamed"])
    # One-sided layers: their own side's value (from the one pairing, gate.diff), NaN on the
    # other; diverged.fc is skipped in B, so it has no value on either side.
    removed = base["layers"][-1]["name"]
    assert result.a[-1] == pytest.approx(a[removed]) and np.isnan(result.b[-1])
    assert np.isnan(result.a[len(common)]) and np.isnan(result.b[len(common) + 1])
    assert result.diff.removed_values == {removed: {"alpha": pytest.approx(a[removed])}}
    assert list(result.diff.added_values) == ["head.renamed", "diverged.fc"]
    assert set(result.diff.to_dict()) == {
        "schema", "a", "b", "metrics", "layers", "added", "removed", "warnings"
    }  # fmt: skip
    proc = run("plot", "diff", reports["base"], reports["new"], "-o", tmp_path / "r.png",
               "--ratio", "--metric", "spectral_norm")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run("plot", "diff", reports["base"], reports["new"], "-o", tmp_path / "x.gif")
    assert proc.returncode == 2 and not (tmp_path / "x.gif").exists()


def test_a_checkpoint_baseline_is_analysed_like_the_stored_report(tmp_path: Path) -> None:
    """The stored side is read first whichever side it is on: a checkpoint baseline takes the
    report's fit (median here), so an unchanged model has no delta."""
    from htsr_cli.assets import default_checkpoint

    demo = str(default_checkpoint())
    report = tmp_path / "pr.json"
    made = clirunner.run(["analyze", demo, "--fit", "median", "--format", "json", "-o", report])
    assert made.returncode == 0, made.stderr
    proc = clirunner.run(
        ["gate", report, "--baseline", demo, "--fail-if", "max(delta(alpha)) > 0", "--no-config"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fit" not in proc.stderr  # no warning that the two sides used different fits


def test_plot_diff_refuses_stdin_twice(tmp_path: Path) -> None:
    proc = clirunner.run(["plot", "diff", "-", "-", "-o", tmp_path / "d.png"], stdin="{}")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "once" in lines[0], proc.stderr
    assert not (tmp_path / "d.png").exists()


def test_gate_help_shows_the_config_tables_literally() -> None:
    proc = clirunner.run(["gate", "--help"], env={**os.environ, "COLUMNS": "200"})
    assert "[tool.htsr.gate] in pyproject.toml or [gate] in htsr.toml" in proc.stdout


def test_show_config_follows_the_output_extension_and_refuses_other_formats(
    tmp_path: Path,
) -> None:
    out = tmp_path / "cfg.json"
    proc = clirunner.run(
        ["gate", "--show-config", "--no-config", "--fail-if", "alpha > 6", "-o", out]
    )
    assert proc.returncode == 0, proc.stderr
    assert "alpha > 6" in json.dumps(json.loads(out.read_text()))  # JSON, by the extension
    bad = clirunner.run(["gate", "--show-config", "--no-config", "--format", "junit"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "text or json" in bad.stderr
