"""The budget arithmetic of ``htsr prune`` against hand computations (docs/prune.md).

Every expected number below is worked out by hand from the formulas (AlphaPruning's linear
map, the thesis's proportional rule and its 0.01 steps, ERK, LAMP), or by a brute-force
oracle written independently of the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from htsr_cli.errors import InputError
from htsr_cli.prune import budgets as B


def test_linear_mapping_spans_one_plus_minus_eps():
    # min 2 -> 1 - 0.2, max 6 -> 1 + 0.2, 4 halfway
    np.testing.assert_allclose(B.metric_scores([2, 4, 6], eps=0.2), [0.8, 1.0, 1.2])
    np.testing.assert_allclose(
        B.metric_scores([2, 4, 6], eps=0.2, more_where="smaller"), [1.2, 1.0, 0.8]
    )
    np.testing.assert_allclose(B.metric_scores([3, 3, 3], eps=0.5), [1, 1, 1])


def test_proportional_mapping_is_the_metric_or_its_inverse():
    r = B.metric_scores([1, 2, 4], mapping="proportional")
    np.testing.assert_allclose(r / r[0], [1, 2, 4])
    r = B.metric_scores([1, 2, 4], mapping="proportional", more_where="smaller")
    np.testing.assert_allclose(r / r[2], [4, 2, 1])
    with pytest.raises(InputError, match="positive metric values"):
        B.metric_scores([1.0, -0.5], mapping="proportional")


def test_calibrate_by_hand():
    # scores 1, 2, 3 on 100, 200, 300 weights, remove 300: c*(100 + 400 + 900) = 300
    k = B.calibrate([1, 2, 3], [100, 200, 300], 300, max_ratio=0.95)
    np.testing.assert_allclose(k, [3 / 14, 6 / 14, 9 / 14], rtol=1e-12)
    # scores 1, 2, 8 on 100 each, remove 120, max 0.6: unclamped c = 120/1100 gives the
    # third layer 0.87 > 0.6, so it is clamped and 60 + c*300 = 120, c = 0.2
    k = B.calibrate([1, 2, 8], [100, 100, 100], 120, max_ratio=0.6)
    np.testing.assert_allclose(k, [0.2, 0.4, 0.6], rtol=1e-12)
    assert not B.calibrate([1, 2], [10, 10], 0).any()


def test_calibrate_refuses_an_unreachable_target():
    with pytest.raises(InputError, match="max-ratio"):
        B.calibrate([1, 1], [100, 100], 191, max_ratio=0.95)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.floats(0.8, 1.2)), min_size=1, max_size=12),
    st.floats(0.0, 0.6),
)
def test_calibrate_without_clamp_is_alphapruning_rescaling(layers, s):
    # AlphaPruning: k_i = S * r_i * sum(n) / sum(n * r); with r in [0.8, 1.2] and S <= 0.6
    # no ratio exceeds 0.9, so the clamp at 0.95 never acts.
    n = np.array([a for a, _ in layers], dtype=float)
    r = np.array([b for _, b in layers])
    k = B.calibrate(r, n, s * n.sum(), max_ratio=0.95)
    np.testing.assert_allclose(k, s * r * n.sum() / (n * r).sum(), rtol=1e-9, atol=1e-12)


def test_erk_by_hand_with_dense_layers():
    # conv (16,3,3,3): n 432, dims sum 25; conv (32,16,3,3): n 4608, sum 60;
    # linear (10,32): n 320, sum 42. Keep half of 5360 = 2680.
    # eps = 2680/(25+60+42) = 21.1 makes layer 1 denser than 1 (21.1*25/432 = 1.22): dense;
    # then eps = (2680-432)/(60+42) = 22.04 makes layer 3 dense (22.04*42/320 = 2.89);
    # then eps = (2680-432-320)/60 and layer 2 keeps 1928/4608 of its weights.
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)]
    k = B.erk_ratios(shapes, 2680, max_ratio=0.95)
    np.testing.assert_allclose(k, [0.0, 1 - 1928 / 4608, 0.0], atol=1e-12)


def test_erk_without_dense_layers_follows_the_formula():
    # two big layers: density eps*(sum dims)/(prod dims), one eps for both
    shapes = [(64, 64, 3, 3), (128, 64, 3, 3)]
    n = np.array([36864, 73728])
    raw = np.array([64 + 64 + 6, 128 + 64 + 6]) / n
    keep = 0.3 * n.sum()
    eps = keep / (n * raw).sum()
    k = B.erk_ratios(shapes, 0.7 * n.sum(), max_ratio=0.95)
    np.testing.assert_allclose(k, 1 - eps * raw, rtol=1e-12)
    assert (n * (1 - k)).sum() == pytest.approx(keep)


def test_lamp_scores_by_hand():
    # squares sorted: 1, 4, 9; tail sums 14, 13, 9
    np.testing.assert_allclose(B.lamp_scores(np.array([3.0, -1.0, 2.0])), [1 / 14, 4 / 13, 1])
    assert B.lamp_scores(np.zeros(3)).tolist() == [0, 0, 0]


def test_lamp_counts_take_the_global_smallest_scores():
    a, b = np.array([0.1, 0.3, 1.0]), np.array([0.05, 0.2, 0.5, 1.0])
    assert B.lamp_counts([a, b], 3).tolist() == [1, 2]  # 0.05, 0.1, 0.2
    # a tie at the threshold goes to the first layer, and the total stays exact
    assert B.lamp_counts([np.array([0.5, 1.0]), np.array([0.5, 1.0])], 1).tolist() == [1, 0]


def test_lamp_counts_against_a_brute_force_oracle():
    rng = np.random.default_rng(3)
    layers = [rng.standard_normal(n) * s for n, s in ((50, 1.0), (200, 0.1), (120, 3.0))]

    def naive_scores(w: np.ndarray) -> list[float]:
        sq = sorted(float(x) ** 2 for x in w)
        return [sq[u] / sum(sq[u:]) for u in range(len(sq))]

    everything = sorted((s, i) for i, w in enumerate(layers) for s in naive_scores(w))
    removed = 185
    expected = [sum(1 for _, i in everything[:removed] if i == j) for j in range(3)]
    got = B.lamp_counts([B.lamp_scores(w) for w in layers], removed)
    assert got.tolist() == expected
    assert got.sum() == removed


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.floats(0.0, 0.95)), min_size=1, max_size=10))
def test_integer_counts_are_exact_and_within_one_of_the_ratio(layers):
    n = np.array([a for a, _ in layers])
    k = np.array([b for _, b in layers])
    removed = int(round(float((k * n).sum())))
    counts = B.integer_counts(k, n, removed)
    assert counts.sum() == removed
    assert np.all(np.abs(counts - k * n) < 1 + 1e-9)
    assert np.all((counts >= 0) & (counts <= n))


def test_thesis_steps_stop_before_over_pruning():
    # budgets 0.1 and 0.5 on 100 weights each, target 45: step t gives
    # min(t/100, 0.1)*100 + min(t/100, 0.5)*100 = 10 + t for t >= 10; t = 35 gives 45 exactly
    counts, level = B.stepped_counts([0.1, 0.5], [100, 100], 45, 0.01)
    assert counts.tolist() == [10, 35] and level == pytest.approx(0.35)
    # target 46 is reached exactly at t = 36
    counts, _ = B.stepped_counts([0.1, 0.5], [100, 100], 46, 0.01)
    assert counts.tolist() == [10, 36]
    # 0.02 steps cannot hit 45: 0.34 removes 10 + 34 = 44, 0.36 would remove 46 > 45
    counts, level = B.stepped_counts([0.1, 0.5], [100, 100], 45, 0.02)
    assert counts.tolist() == [10, 34] and level == pytest.approx(0.34)
    # budgets too small for the target: every layer stops at its budget, short of it
    counts, level = B.stepped_counts([0.1, 0.1], [100, 100], 50, 0.01)
    assert counts.tolist() == [10, 10] and level == pytest.approx(0.1)


def test_step_budgets_scale_the_largest_to_max_ratio():
    np.testing.assert_allclose(B.step_budgets([0.2, 0.4], 0.9), [0.45, 0.9])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"method": "magic"}, "unknown method"),
        ({"mapping": "cubic"}, "unknown --mapping"),
        ({"more_where": "up"}, "unknown --more-where"),
        ({"eps": 1.0}, "--eps"),
        ({"max_ratio": 1.0}, "--max-ratio"),
        ({"budget_step": 0.0}, "--budget-step"),
    ],
)
def test_check_method_refuses_bad_options(kwargs, needle):
    args = {
        "method": "metric",
        "mapping": "linear",
        "more_where": "larger",
        "eps": 0.2,
        "max_ratio": 0.95,
        "budget_step": None,
        **kwargs,
    }
    with pytest.raises(InputError, match=needle):
        B.check_method(**args)
