"""docs/ci.md works as written: its GitHub Actions workflow's ``run:`` steps and its GitLab
job's script run in bash, with the gate configuration of the same page, against real
checkpoints (the built-in demo CNN and a copy with one layer changed).

The ``uses:`` steps are GitHub's own (checkout, cache, artifacts): the test plays the cache by
copying ``.htsr/baseline.json`` from the default-branch run into the PR's workspace. The one
step skipped is ``pip install htsr`` (the package under test is installed already); ``htsr``
on PATH runs this interpreter's htsr.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from junitparser import JUnitXml
from safetensors.torch import load_file, save_file

from htsr_cli.assets import default_checkpoint

yaml = pytest.importorskip("yaml")

DOC = Path(__file__).resolve().parent.parent / "docs" / "ci.md"
CHANGED_LAYER = "features.6"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def github_workflow() -> dict:
    (wf,) = [yaml.safe_load(b) for b in blocks("yaml") if "jobs:" in b]
    return wf


def gitlab_jobs() -> dict:
    (jobs,) = [yaml.safe_load(b) for b in blocks("yaml") if ".htsr:" in b]
    return jobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ci")
    bin_dir = d / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "htsr"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m htsr_cli "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    base = load_file(str(default_checkpoint()))
    changed = dict(base)
    w = base[f"{CHANGED_LAYER}.weight"]
    g = torch.Generator().manual_seed(1)
    changed[f"{CHANGED_LAYER}.weight"] = w + 3 * w.std() * torch.randn(w.shape, generator=g)
    save_file(changed, str(d / "changed.safetensors"))
    (toml,) = [b for b in blocks("toml") if "[tool.htsr.gate]" in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CI_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    return {"dir": d, "base": default_checkpoint(), "changed": d / "changed.safetensors",
            "pyproject": toml, "env": env}  # fmt: skip


def workspace(setup: dict, name: str, checkpoint: Path, baseline: Path | None) -> Path:
    ws = setup["dir"] / name
    (ws / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, ws / "checkpoints" / "model.safetensors")
    (ws / "pyproject.toml").write_text(setup["pyproject"])
    if baseline is not None:  # actions/cache/restore
        (ws / ".htsr").mkdir()
        shutil.copy(baseline, ws / ".htsr" / "baseline.json")
    return ws


def run_github(
    setup: dict, ws: Path, default_branch: bool
) -> dict[str, subprocess.CompletedProcess]:
    job = github_workflow()["jobs"]["htsr-gate"]
    env = {**setup["env"], **job["env"], "GITHUB_STEP_SUMMARY": str(ws / "summary.md")}
    done: dict[str, subprocess.CompletedProcess] = {}
    failed = False
    for step in job["steps"]:
        cond = step.get("if", "")
        if "default_branch" in cond and not default_branch:
            continue
        if failed and "!cancelled()" not in cond and "always()" not in cond:
            continue
        if "run" not in step or step.get("name") == "Install htsr":
            continue
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=ws, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        done[step["name"]] = proc
        failed = failed or proc.returncode != 0
    return done


@pytest.mark.slow
def test_github_workflow_steps(setup):
    main = workspace(setup, "main", setup["base"], None)
    steps = run_github(setup, main, default_branch=True)
    gate = steps["Gate against the baseline"]
    assert steps["Analyse the checkpoint"].returncode == 0, steps["Analyse the checkpoint"].stderr
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "no baseline cached yet" in gate.stdout
    baseline = main / ".htsr" / "baseline.json"  # what actions/cache/save would keep
    assert baseline.exists() and "Make this report the baseline" in steps

    pr = workspace(setup, "pr", setup["changed"], baseline)
    steps = run_github(setup, pr, default_branch=False)
    gate = steps["Gate against the baseline"]
    assert gate.returncode == 1, gate.stdout + gate.stderr
    errors = [ln for ln in gate.stdout.splitlines() if ln.startswith("::error ")]
    # One annotation per failing gate and layer: the changed layer, then the drift of the mean.
    assert [ln.split("::")[2].split(":")[0] for ln in errors] == [
        CHANGED_LAYER,
        "FAIL mean(delta(alpha)) > 0.1",
    ], errors
    assert errors[0].startswith("::error title=htsr gate%3A delta(alpha) > 0.5::"), errors
    assert "Make this report the baseline" not in steps
    suite = next(iter(JUnitXml.fromfile(str(pr / ".htsr" / "gates.xml"))))
    assert (suite.failures, suite.tests) == (2, 5)
    assert "### htsr gate: FAILED" in (pr / "summary.md").read_text()

    same = workspace(setup, "pr-same", setup["base"], baseline)
    gate = run_github(setup, same, default_branch=False)["Gate against the baseline"]
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert gate.stdout.splitlines()[-1] == "htsr gate: passed, 5 of 5 gates"


def run_gitlab(setup: dict, ws: Path, default_branch: bool) -> subprocess.CompletedProcess:
    template = gitlab_jobs()[".htsr"]
    lines = [ln for ln in template["script"] if ln.strip() != "pip install htsr"]
    env = {**setup["env"], **template["variables"], "CI_DEFAULT_BRANCH": "main",
           "CI_COMMIT_BRANCH": "main" if default_branch else "feature"}  # fmt: skip
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", "\n".join(lines)],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_gitlab_job_script(setup):
    jobs = gitlab_jobs()
    assert jobs["htsr-gate"]["cache"]["policy"] == "pull"
    assert jobs["htsr-baseline"]["cache"]["policy"] == "pull-push"
    main = workspace(setup, "gl-main", setup["base"], None)
    proc = run_gitlab(setup, main, default_branch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    baseline = main / ".htsr" / "baseline.json"
    assert baseline.exists()
    mr = workspace(setup, "gl-mr", setup["changed"], baseline)
    proc = run_gitlab(setup, mr, default_branch=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL delta(alpha) > 0.5: 1 layer ({CHANGED_LAYER})" in proc.stdout
    # An MR never replaces the baseline (only the default branch does).
    assert (mr / ".htsr" / "baseline.json").read_bytes() == baseline.read_bytes()
    assert next(iter(JUnitXml.fromfile(str(mr / ".htsr" / "gates.xml")))).failures >= 1
    assert (mr / ".htsr" / "gates.md").read_text().startswith("### htsr gate: FAILED")


def test_precommit_hook_entry_is_valid():
    (hooks,) = [yaml.safe_load(b) for b in blocks("yaml") if "repos:" in b]
    (hook,) = hooks["repos"][0]["hooks"]
    assert hook["entry"].split()[:2] == ["htsr", "gate"] and hook["pass_filenames"] is False
    assert re.match(hook["files"], "reports/model.json")
