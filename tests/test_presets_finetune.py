"""``htsr finetune --preset tempbalance``: the re-allocation takes TempBalance's analysis
conventions, as ``htsr allocate --preset tempbalance`` does (docs/presets.md)."""

from __future__ import annotations

from pathlib import Path

import clirunner
import pytest
import torch

from htsr_cli.allocate.schemes import allocate
from htsr_cli.finetune.run_dir import RunDir
from htsr_cli.io.checkpoint import save_safetensors
from htsr_cli.models import build_model

BASE = ["finetune", "--arch", "vgg19", "--width", "0.125", "--data", "digits"]
BASE += ["--batch-size", "64", "--epochs", "1", "--lr", "0.05"]


@pytest.fixture(scope="module")
def init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("preset") / "init.safetensors"
    save_safetensors(build_model("vgg19", 10, width=0.125).state_dict(), path)
    return path


def test_finetune_preset_allocates_as_allocate_does(init: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = clirunner.run(
        [*BASE, "--init", init, "--allocate", "tb-linear", "--preset", "tempbalance", "-o", run]
    )
    assert proc.returncode == 0, proc.stderr
    # The oracle: the same plan from allocate --preset on the same initial weights. The
    # first epoch trains at the base LR (cosine epoch 1), so each layer's LR is the plan's.
    plan = allocate(str(init), lr=0.05, scheme="tb-linear", preset="tempbalance")
    (record,) = RunDir(run).read_history()
    allocated = [p for p in plan.layers if p.status == "allocated"]
    assert allocated, "the preset's plan allocates some layer"
    for p in plan.layers:
        assert record["lr"][p.name] == pytest.approx(p.lr, rel=1e-12), p.name
    assert RunDir(run).read_args()["preset"] == "tempbalance"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--allocate", "tb-linear", "--preset", "alphapruning"], "does not apply to finetune"),
        (["--preset", "tempbalance"], "give --allocate"),
        (["--allocate", "tb-linear", "--preset", "tempbalance", "--fit", "clip-xmax"], "clip-xmax"),
        (["--allocate", "tb-linear", "--preset", "nope"], "unknown --preset"),
    ],
)
def test_finetune_preset_bad_input(extra: list[str], needle: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = clirunner.run([*BASE, *extra, "-o", run])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsr: error: ") and needle in lines[0]
    assert not run.exists()
