"""Library tests of ``allocate`` (docs/allocate.md): every scheme against multipliers computed by
hand, mean preservation, guards, invert, clipping, seeds, AlphaDecay, plan round trip and the
rejection of bad input."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from htsr_cli.allocate.plan import LRPlan
from htsr_cli.allocate.schemes import (
    MIN_MULTIPLIER,
    SCHEMES,
    allocate,
    parse_scheme,
    scheme_multipliers,
)
from htsr_cli.errors import InputError

ALPHAS = [2.0, 3.0, 4.0, 6.0]
N = len(ALPHAS)
ALL = [
    "tb-linear",
    "rank",
    "proportional",
    "power:2",
    "power:1/2",
    "log2",
    "softmax",
    "negpow2",
    "sample-normal",
    "sample-rank",
    "sample-emg",
]
MEAN_PRESERVING = [
    "proportional",
    "power:2",
    "power:1/3",
    "log2",
    "softmax",
    "negpow2",
    "sample-normal",
    "sample-rank",
    "sample-emg",
]
OPEN = {"all_layers": True, "min_evals": 0}  # guards off


def analysis(values, *, evals=None, metric="alpha", drop=()):
    """A minimal ``htsr.analysis/1`` document with one layer per value."""
    layers = []
    for i, v in enumerate(values):
        row = {"name": f"l{i}", "num_evals": 100 if evals is None else evals[i], "warning": ""}
        if i not in drop:
            row[metric] = v
        layers.append(row)
    return {
        "schema": "htsr.analysis/1",
        "source": {"path": "x.safetensors"},
        "options": {"fit": "ww", "metrics": [metric]},
        "layers": layers,
    }


def mults(values, scheme, **kw):
    m, _ = scheme_multipliers(values, scheme, **kw)
    return m


# --------------------------------------------------------------------------------------------
# Hand-computed multipliers, alphas [2, 3, 4, 6], s1 = 0.5, s2 = 1.5


def test_tb_linear():
    # 0.5 + 1.0 * (m - 2) / 4
    assert mults(ALPHAS, "tb-linear") == pytest.approx([0.5, 0.75, 1.0, 1.5])
    assert mults(ALPHAS, "tb-linear", s1=0.8, s2=1.2) == pytest.approx([0.8, 0.9, 1.0, 1.2])


def test_tb_linear_all_equal_is_one():
    assert mults([3.0, 3.0, 3.0], "tb-linear") == pytest.approx([1.0, 1.0, 1.0])


def test_rank():
    # TempBalance tb_step: s1 + (s2 - s1) * rank / n, rank 0-based ascending
    assert mults(ALPHAS, "rank") == pytest.approx([0.5, 0.75, 1.0, 1.25])
    assert mults([6.0, 2.0, 4.0, 3.0], "rank") == pytest.approx([1.25, 0.5, 1.0, 0.75])


def test_rank_ties_follow_layer_order():
    assert mults([3.0, 3.0, 1.0], "rank") == pytest.approx([0.5 + 1 / 3, 0.5 + 2 / 3, 0.5])
    assert mults([5.0], "rank") == pytest.approx([1.0])


def test_proportional():
    assert mults(ALPHAS, "proportional") == pytest.approx([8 / 15, 12 / 15, 16 / 15, 24 / 15])


@pytest.mark.parametrize("text", ["power:2", "power:2.0"])
def test_power_2(text):
    # squares 4, 9, 16, 36: sum 65
    assert mults(ALPHAS, text) == pytest.approx([16 / 65, 36 / 65, 64 / 65, 144 / 65])


@pytest.mark.parametrize("text", ["power:1/2", "power:0.5"])
def test_power_half(text):
    r = [math.sqrt(a) for a in ALPHAS]
    assert mults(ALPHAS, text) == pytest.approx([4 * x / sum(r) for x in r])


def test_power_1_is_proportional():
    assert mults(ALPHAS, "power:1") == pytest.approx(mults(ALPHAS, "proportional"))


def test_log2():
    lg = [1.0, math.log2(3), 2.0, math.log2(6)]  # sum = 3 + log2(18)
    total = 3 + math.log2(18)
    assert mults(ALPHAS, "log2") == pytest.approx([4 * x / total for x in lg])
    assert sum(lg) == pytest.approx(total)


def test_softmax():
    e = [math.exp(a) for a in ALPHAS]
    assert mults(ALPHAS, "softmax") == pytest.approx([4 * x / sum(e) for x in e])


def test_softmax_is_stable_for_large_values():
    m = mults([1000.0, 1001.0], "softmax")
    assert m == pytest.approx([2 / (1 + math.e), 2 * math.e / (1 + math.e)])


def test_negpow2():
    # shares 2^-4, 2^-3, 2^-2, 2^-1 + 2^-4 (the residue), times n = 4
    assert mults(ALPHAS, "negpow2") == pytest.approx([0.25, 0.5, 1.0, 2.25])
    assert mults([6.0, 2.0, 4.0, 3.0], "negpow2") == pytest.approx([2.25, 0.25, 1.0, 0.5])


def test_sample_normal_by_hand():
    y = np.array(ALPHAS) + np.random.default_rng(7).standard_normal(N)
    assert mults(ALPHAS, "sample-normal", seed=7) == pytest.approx(4 * y / y.sum())


def test_sample_rank_by_hand():
    # base LR 5 keeps every draw of N(5, 1) positive; the largest alpha gets the largest draw
    x = np.sort(np.random.default_rng(3).normal(5.0, 1.0, N))
    got = mults([6.0, 2.0, 4.0, 3.0], "sample-rank", seed=3, base_lr=5.0)
    want = 4 * x / x.sum()
    assert got == pytest.approx([want[3], want[0], want[2], want[1]])


def test_sample_emg_by_hand():
    # y = m + (Z - 1/nu) + eps, Z ~ Exp(nu), 1/nu = mean(m): Z drawn first, then eps
    def draws(seed):
        rng = np.random.default_rng(seed)
        z, eps = rng.standard_exponential(N), rng.standard_normal(N)
        mean = sum(ALPHAS) / N
        return np.array(ALPHAS) + (z * mean - mean) + eps

    seed = next(s for s in range(100) if (draws(s) > 0).all())  # a draw with nothing to clip
    y = draws(seed)
    assert mults(ALPHAS, "sample-emg", seed=seed) == pytest.approx(4 * y / y.sum())
    # a draw with a negative y: that layer is clipped to the floor, the rest keep proportions
    seed = next(s for s in range(100) if (draws(s) <= 0).sum() == 1)
    y = draws(seed)
    m, clipped = scheme_multipliers(ALPHAS, "sample-emg", seed=seed)
    assert clipped == 1 and m[y <= 0] == pytest.approx(MIN_MULTIPLIER, rel=1e-5)
    keep = y > 0
    assert m[keep] == pytest.approx((4 - m[~keep].sum()) * y[keep] / y[keep].sum())


def test_sample_rank_needs_base_lr():
    with pytest.raises(InputError, match="base_lr"):
        scheme_multipliers(ALPHAS, "sample-rank")


# --------------------------------------------------------------------------------------------
# Invert: larger metric, smaller multiplier


def test_invert_by_hand():
    assert mults(ALPHAS, "tb-linear", invert=True) == pytest.approx([1.5, 1.25, 1.0, 0.5])
    assert mults(ALPHAS, "rank", invert=True) == pytest.approx([1.25, 1.0, 0.75, 0.5])
    # 1/m: 1/2, 1/3, 1/4, 1/6 (sum 5/4)
    assert mults(ALPHAS, "proportional", invert=True) == pytest.approx([1.6, 16 / 15, 0.8, 8 / 15])
    assert mults(ALPHAS, "negpow2", invert=True) == pytest.approx([2.25, 1.0, 0.5, 0.25])
    e = [math.exp(-a) for a in ALPHAS]
    assert mults(ALPHAS, "softmax", invert=True) == pytest.approx([4 * x / sum(e) for x in e])


@pytest.mark.parametrize("scheme", ALL)
def test_invert_gives_larger_metric_a_smaller_multiplier(scheme):
    # sample-normal: gaps of many sigmas, so its unit noise cannot swap two layers;
    # sample-rank: base LR 50, so every draw of N(50, 1) is positive
    values = (
        [40.0, 10.0, 160.0, 20.0, 80.0] if scheme == "sample-normal" else [4.0, 2.0, 8.0, 3.0, 6.0]
    )
    order = np.argsort(values)
    seeds = range(300) if scheme == "sample-emg" else [0]
    up = np.mean([mults(values, scheme, seed=s, base_lr=50.0) for s in seeds], axis=0)
    down = np.mean(
        [mults(values, scheme, seed=s, base_lr=50.0, invert=True) for s in seeds], axis=0
    )
    if scheme == "sample-emg":
        # its exponential term has the scale of mean(m): one draw need not be monotone, the
        # average over seeds is
        up, down = up[order[[0, -1]]], down[order[[0, -1]]]
    else:
        up, down = up[order], down[order]
    assert np.all(np.diff(up) > 0), (scheme, up)
    assert np.all(np.diff(down) < 0), (scheme, down)


@pytest.mark.parametrize("scheme", ["sample-normal", "sample-emg"])
def test_inverted_samples_are_reciprocal(scheme):
    # same draws y; the inverted plan is inversely proportional to them
    values = [2.0, 3.0, 4.0, 6.0, 5.0]
    up = mults(values, scheme, seed=4)
    down = mults(values, scheme, seed=4, invert=True)
    assert up * down == pytest.approx(np.full(5, (up * down)[0]))


# --------------------------------------------------------------------------------------------
# Properties: mean preservation, positivity, clipping, seeds

finite_metrics = st.lists(st.floats(min_value=1.01, max_value=50.0), min_size=1, max_size=30)
any_metrics = st.lists(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-5, max_value=10)
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("scheme", MEAN_PRESERVING)
@settings(max_examples=60, deadline=None)
@given(values=finite_metrics, seed=st.integers(0, 2**32), invert=st.booleans())
def test_mean_preserving(scheme, values, seed, invert):
    m, _ = scheme_multipliers(values, scheme, seed=seed, invert=invert, base_lr=0.1)
    assert np.mean(m) == pytest.approx(1.0, rel=1e-9)
    assert np.all(np.isfinite(m)) and np.all(m > 0)


@pytest.mark.parametrize("scheme", ALL)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=any_metrics, seed=st.integers(0, 1000), invert=st.booleans(), lr=st.floats(1e-6, 10.0)
)
def test_no_plan_holds_a_bad_multiplier(scheme, values, seed, invert, lr):
    plan = allocate(analysis(values), lr=lr, scheme=scheme, seed=seed, invert=invert, **OPEN)
    m = np.array([p.multiplier for p in plan.layers])
    assert np.all(np.isfinite(m)) and np.all(m > 0)
    assert np.all(m >= MIN_MULTIPLIER * (1 - 1e-6)) or scheme in ("tb-linear", "rank")
    lrs = np.array([p.lr for p in plan.layers])
    assert np.all(np.isfinite(lrs)) and np.all(lrs > 0)
    assert plan.params["clipped"] <= plan.params["allocated"]
    for p, v in zip(plan.layers, values, strict=True):
        if not math.isfinite(v):
            assert (p.status, p.multiplier) == ("base", 1.0)
    doc = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert LRPlan.from_dict(doc).multipliers() == plan.multipliers()


def test_log2_clips_metrics_at_or_below_one():
    m, clipped = scheme_multipliers([0.5, 1.0, 2.0, 4.0], "log2")
    assert clipped == 2
    assert np.all(m > 0) and np.mean(m) == pytest.approx(1.0)
    # the two valid layers share in proportion to log2 m = 1, 2
    assert m[3] / m[2] == pytest.approx(2.0, rel=1e-5)
    assert m[0] == m[1] < 1e-5


def test_nonpositive_metric_is_clipped_in_the_proportional_family():
    for scheme in ("proportional", "power:1/2", "power:3"):
        m, clipped = scheme_multipliers([-2.0, 0.0, 3.0], scheme)
        assert clipped == 2 and np.all(m > 0) and np.mean(m) == pytest.approx(1.0)


def test_sample_rank_clips_negative_draws_and_counts_them():
    # N(0.1, 1) draws are negative almost half of the time (thesis eq. 2.28, followed literally)
    values = list(np.linspace(2, 6, 40))
    x = np.random.default_rng(0).normal(0.1, 1.0, 40)
    m, clipped = scheme_multipliers(values, "sample-rank", seed=0, base_lr=0.1)
    assert clipped == int((x <= 0).sum()) > 0
    assert np.all(m > 0) and np.mean(m) == pytest.approx(1.0)
    assert np.all(np.diff(m) >= 0)  # still monotone in the metric
    plan = allocate(analysis(values), lr=0.1, scheme="sample-rank", **OPEN)
    assert plan.params["clipped"] == clipped


def test_everything_clipped_falls_back_to_the_base_lr():
    m, clipped = scheme_multipliers([0.5, 0.9], "log2")
    assert clipped == 2 and list(m) == [1.0, 1.0]


def test_negpow2_underflow_is_clipped():
    m, clipped = scheme_multipliers(list(range(1, 41)), "negpow2")
    assert clipped > 0 and np.all(m > 0) and np.mean(m) == pytest.approx(1.0)


@pytest.mark.parametrize("scheme", ["sample-normal", "sample-rank", "sample-emg"])
def test_same_seed_same_plan_other_seed_differs(scheme):
    doc = analysis([2.5, 3.1, 4.2, 5.0, 3.3, 2.9])
    a = allocate(doc, lr=0.5, scheme=scheme, seed=5, **OPEN)
    b = allocate(doc, lr=0.5, scheme=scheme, seed=5, **OPEN)
    c = allocate(doc, lr=0.5, scheme=scheme, seed=6, **OPEN)
    assert a.to_dict() == b.to_dict()
    assert a.multipliers() != c.multipliers()
    assert a.params["seed"] == 5


def test_scheme_multipliers_refuses_non_finite_values():
    with pytest.raises(ValueError):
        scheme_multipliers([1.0, math.nan], "tb-linear")


# --------------------------------------------------------------------------------------------
# Guards


def test_first_and_last_layer_keep_the_base_lr():
    plan = allocate(analysis(ALPHAS + [5.0, 7.0]), lr=0.1, min_evals=0)
    status = [(p.status, p.multiplier) for p in plan.layers]
    assert status[0] == ("base", 1.0) and status[-1] == ("base", 1.0)
    assert "first layer" in plan.layers[0].reason and "last layer" in plan.layers[-1].reason
    # the scheme runs over the 4 middle layers: alphas 3, 4, 6, 5
    assert [p.multiplier for p in plan.layers[1:-1]] == pytest.approx(
        [0.5, 0.5 + 1 / 3, 1.5, 0.5 + 2 / 3]
    )
    assert all(p.status == "allocated" and not p.reason for p in plan.layers[1:-1])
    assert plan.params["allocated"] == 4


def test_all_layers_allocates_first_and_last():
    plan = allocate(analysis(ALPHAS), lr=0.1, **OPEN)
    assert [p.multiplier for p in plan.layers] == pytest.approx([0.5, 0.75, 1.0, 1.5])
    assert [p.lr for p in plan.layers] == pytest.approx([0.05, 0.075, 0.1, 0.15])
    assert {p.status for p in plan.layers} == {"allocated"}


def test_non_finite_and_missing_metric_keep_the_base_lr():
    doc = analysis([2.0, math.nan, 3.0, None, 4.0, math.inf, 6.0], drop={3})
    doc["layers"][1]["warning"] = "fit failed: all eigenvalues zero"
    plan = allocate(doc, lr=0.2, **OPEN)
    by = {p.name: p for p in plan.layers}
    for name in ("l1", "l3", "l5"):
        assert (by[name].status, by[name].multiplier, by[name].lr) == ("base", 1.0, 0.2)
    assert by["l1"].reason == "alpha not finite (fit failed: all eigenvalues zero)"
    assert by["l3"].reason == "alpha missing"
    assert [by[n].multiplier for n in ("l0", "l2", "l4", "l6")] == pytest.approx(
        [0.5, 0.75, 1.0, 1.5]
    )


def test_few_eigenvalues_keep_the_base_lr():
    plan = allocate(analysis(ALPHAS, evals=[49, 50, 200, 10]), lr=0.1, all_layers=True)
    assert [p.status for p in plan.layers] == ["base", "allocated", "allocated", "base"]
    assert plan.layers[0].reason == "49 eigenvalues < min_evals 50"
    assert [p.multiplier for p in plan.layers] == pytest.approx([1.0, 0.5, 1.5, 1.0])


def test_guard_reasons_combine():
    plan = allocate(analysis([math.nan, 3.0, 4.0], evals=[8, 100, 100]), lr=0.1)
    assert plan.layers[0].reason == (
        "alpha not finite; 8 eigenvalues < min_evals 50; first layer (base LR unless --all-layers)"
    )


def test_metric_absent_from_every_layer_is_an_error():
    with pytest.raises(InputError, match=r"analysis has no metric stable_rank .*--metrics"):
        allocate(analysis(ALPHAS), lr=0.1, metric="stable_rank")


def test_other_metric():
    doc = analysis([10.0, 20.0, 30.0], metric="stable_rank")
    plan = allocate(doc, lr=1.0, metric="stable_rank", scheme="proportional", **OPEN)
    assert plan.metric == "stable_rank"
    assert [p.multiplier for p in plan.layers] == pytest.approx([0.5, 1.0, 1.5])


# --------------------------------------------------------------------------------------------
# AlphaDecay weight decay


def test_alphadecay_wd_multipliers():
    plan = allocate(analysis([9.0] + ALPHAS + [1.0]), lr=0.1, wd=5e-4, min_evals=0)
    wd = plan.wd_multipliers()
    assert wd["l0"] == wd["l5"] == 1.0  # guarded
    # 0.667 + (3 - 0.667) * (m - 2) / 4
    want = [0.667 + 2.333 * (a - 2) / 4 for a in ALPHAS]
    assert [wd[f"l{i}"] for i in range(1, 5)] == pytest.approx(want)
    assert plan.base_wd == 5e-4 and plan.wd_scheme == "tb-linear"
    assert plan.params["wd_min_ratio"] == 0.667 and plan.params["wd_max_ratio"] == 3.0
    doc = plan.to_dict()
    assert doc["base_wd"] == 5e-4 and doc["layers"][1]["wd_multiplier"] == pytest.approx(0.667)


def test_wd_ignores_invert_and_custom_ratios():
    plan = allocate(
        analysis(ALPHAS), lr=0.1, wd=1e-4, wd_min_ratio=0.5, wd_max_ratio=2.0, invert=True, **OPEN
    )
    assert list(plan.wd_multipliers().values()) == pytest.approx([0.5, 0.875, 1.25, 2.0])
    assert "wd_multiplier" not in allocate(analysis(ALPHAS), lr=0.1).to_dict()["layers"][0]


# --------------------------------------------------------------------------------------------
# The plan document


def test_plan_document_and_round_trip():
    plan = allocate(
        analysis([2.0, math.nan, 3.0, 4.0, 6.0]),
        lr=0.1,
        scheme="power:1/2",
        seed=3,
        min_evals=0,
        wd=5e-4,
    )
    doc = plan.to_dict()
    assert doc["schema"] == "htsr.lr-plan/1"
    assert doc["scheme"] == "power:1/2" and doc["metric"] == "alpha" and doc["base_lr"] == 0.1
    assert doc["source"] == {"path": "x.safetensors"}
    p = doc["params"]
    assert p["p"] == 0.5 and p["s1"] == 0.5 and p["s2"] == 1.5 and p["seed"] == 3
    assert p["invert"] is False and p["min_evals"] == 0 and p["all_layers"] is False
    assert p["clipped"] == 0 and p["analysis_options"]["fit"] == "ww"
    assert set(doc["summary"]) == {"mean_multiplier", "min", "max"}
    assert doc["layers"][1]["metric_value"] is None and doc["layers"][1]["status"] == "base"
    text = json.dumps(doc, allow_nan=False)
    again = LRPlan.from_dict(json.loads(text))
    assert again.to_dict() == json.loads(text)


def test_analysis_object_and_json_path(tmp_path, monkeypatch):
    doc = analysis(ALPHAS)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    from_path = allocate(str(path), lr=0.1, **OPEN)
    assert from_path.source == {"path": "x.safetensors", "analysis": str(path)}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(doc)))
    from_stdin = allocate("-", lr=0.1, **OPEN)
    assert from_stdin.source["analysis"] == "stdin"
    assert (
        from_path.multipliers()
        == from_stdin.multipliers()
        == allocate(doc, lr=0.1, **OPEN).multipliers()
    )


def test_checkpoint_and_module_sources():
    import torch
    from torch import nn

    from htsr_cli.assets import default_checkpoint
    from htsr_cli.engine.analysis import analyze

    plan = allocate(default_checkpoint(), lr=0.1, fit="median", device="cpu")
    assert {p.name for p in plan.layers} == {
        "features.0",
        "features.2",
        "features.6",
        "classifier.0",
        "classifier.3",
        "classifier.5",
    }
    assert plan.params["analysis_options"]["fit"] == "median"
    assert plan.params["analysis_options"]["metrics"] == ["alpha"]
    assert plan.source["format"] == "safetensors" and "analysis" not in plan.source

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 96),
        nn.ReLU(),
        nn.Linear(96, 80),
        nn.ReLU(),
        nn.Linear(80, 70),
        nn.ReLU(),
        nn.Linear(70, 10),
    )
    plan = allocate(net, lr=0.01, device="cpu", min_evals=0)
    assert [p.name for p in plan.layers] == ["0", "2", "4", "6"]
    assert [p.status for p in plan.layers] == ["base", "allocated", "allocated", "base"]
    assert [p.multiplier for p in plan.layers[1:3]] in ([0.5, 1.5], [1.5, 0.5])
    result = analyze(net, metrics=["alpha"], device="cpu")
    assert allocate(result, lr=0.01, min_evals=0).multipliers() == plan.multipliers()
    assert (
        allocate(net.state_dict(), lr=0.01, device="cpu", min_evals=0).multipliers()
        == plan.multipliers()
    )


# --------------------------------------------------------------------------------------------
# Rejections


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema="htsr.lr-plan/1"), "expected 'htsr.analysis/1'"),
        (lambda d: d.update(schema="htsr.analysis/9"), "schema version"),
        (lambda d: d.pop("layers"), "lacks field(s) layers"),
        (lambda d: d.pop("options"), "lacks field(s) options"),
        (lambda d: d["layers"][0].pop("num_evals"), "num_evals"),
        (lambda d: d.update(layers=[]), "no analysed layer"),
        (lambda d: d.update(source="abc"), "'source' must be an object"),
        (lambda d: d.update(options=[1]), "'options' must be an object"),
    ],
)
def test_bad_analysis_documents_are_rejected(mutate, message):
    doc = analysis(ALPHAS)
    mutate(doc)
    with pytest.raises(InputError) as err:
        allocate(doc, lr=0.1)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("params", 1, "'params' must be an object"),
        ("source", "abc", "'source' must be an object"),
        ("base_wd", "x", "base_wd must be a non-negative number"),
    ],
)
def test_bad_plan_documents_are_rejected(key, value, message):
    doc = allocate(analysis(ALPHAS), lr=0.1).to_dict()
    doc[key] = value
    with pytest.raises(InputError) as err:
        LRPlan.from_dict(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plan_fed_as_analysis_is_rejected():
    plan = allocate(analysis(ALPHAS), lr=0.1).to_dict()
    with pytest.raises(InputError, match="lr-plan"):
        allocate(plan, lr=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0}, "--lr must be a positive number"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"lr": math.nan}, "--lr must be a positive number"),
        ({"lr": math.inf}, "--lr must be a positive number"),
        ({"lr": 0.1, "s1": 2.0, "s2": 1.0}, "must not exceed"),
        ({"lr": 0.1, "s1": 0.0}, "--s1 must be positive"),
        ({"lr": 0.1, "s1": -1.0}, "--s1 must be positive"),
        ({"lr": 0.1, "scheme": "cosine"}, "unknown scheme 'cosine'; choose from tb-linear"),
        ({"lr": 0.1, "scheme": "power"}, "needs an exponent"),
        ({"lr": 0.1, "scheme": "power:two"}, "P must be a positive number"),
        ({"lr": 0.1, "scheme": "power:1/0"}, "P must be a positive number"),
        ({"lr": 0.1, "scheme": "power:-1"}, "P must be a positive number"),
        ({"lr": 0.1, "scheme": "softmax:2"}, "unknown scheme"),
        ({"lr": 0.1, "metric": "beta"}, "unknown metric 'beta'"),
        ({"lr": 0.1, "seed": -1}, "--seed"),
        ({"lr": 0.1, "min_evals": -1}, "--min-evals"),
        ({"lr": 0.1, "wd": -1e-4}, "--wd must be"),
        ({"lr": 0.1, "wd": 1e-4, "wd_scheme": "rank"}, "unknown --wd-scheme"),
        ({"lr": 0.1, "wd_scheme": "tb-linear"}, "--wd-scheme needs --wd"),
        ({"lr": 0.1, "wd": 1e-4, "wd_min_ratio": 3.0, "wd_max_ratio": 1.0}, "--wd-min-ratio"),
        ({"lr": 0.1, "wd": 1e-4, "wd_min_ratio": 0.0}, "--wd-min-ratio"),
        ({"lr": 0.1, "fit": "median"}, "--fit applies only to a checkpoint source"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(InputError) as err:
        allocate(analysis(ALPHAS), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        allocate(analysis(ALPHAS), lr=0.1, metrics=["alpha"])


def test_parse_scheme():
    assert parse_scheme("power:1/3") == ("power", {"p": pytest.approx(1 / 3)})
    assert parse_scheme(" rank ") == ("rank", {})
    assert len(SCHEMES) == 10 and "power:P" in SCHEMES
    for text in SCHEMES:
        parse_scheme(text.replace(":P", ":2"))


def test_run_allocate_checks_the_format_once_before_any_work(tmp_path):
    from htsr_cli.allocate.report import run_allocate

    out = tmp_path / "plan.json"
    with pytest.raises(InputError) as err:  # an analysis that would fail: the format goes first
        run_allocate({"schema": "nonsense"}, fmt="xml", output=str(out), lr=0.1)
    assert str(err.value) == "unknown --format 'xml'; choose from table, json, csv"
    assert not out.exists()
    for fmt, first in (("csv", "name,metric_value"), ("json", "{")):
        run_allocate(analysis(ALPHAS), fmt=fmt, output=str(out), lr=0.1)
        assert out.read_text().startswith(first), fmt
