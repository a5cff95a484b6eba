"""Properties of the engine that must hold whatever the weights, and known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from htsr_cli.engine.analysis import analyze_layer
from htsr_cli.engine.fit import fit_power_law
from htsr_cli.engine.spectrum import eigenvalues

SHAPE_FREE = ("stable_rank", "entropy")
ALL = (
    "alpha",
    "stable_rank",
    "entropy",
    "norm",
    "log_norm",
    "spectral_norm",
    "log_spectral_norm",
    "alpha_weighted",
    "log_alpha_norm",
)


def _heavy(seed: int, rows: int, cols: int) -> torch.Tensor:
    """Student-t(3) entries: a heavy-tailed ESD like a trained layer's."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=gen)
    chi2 = torch.randn(rows, cols, 3, generator=gen).pow(2).sum(-1)
    return 0.1 * z / (chi2 / 3).sqrt()


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


shapes = st.tuples(st.integers(24, 90), st.integers(24, 90))
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_transpose_and_permutation_change_nothing(shape, seed):
    w = _heavy(seed, *shape)
    gen = torch.Generator().manual_seed(seed)
    pr = torch.randperm(shape[0], generator=gen)
    pc = torch.randperm(shape[1], generator=gen)
    base = analyze_layer("w", w, metrics=ALL)
    for variant in (w.T.contiguous(), w[pr][:, pc]):
        other = analyze_layer("w", variant, metrics=ALL)
        for m in ALL + ("xmin", "D", "matrix_rank", "num_pl_spikes"):
            assert _close(other[m], base[m], 1e-9), (m, other[m], base[m])


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 10_000), c=st.floats(0.5, 20.0))
def test_scaling_multiplies_norms_by_c_squared(shape, seed, c):
    w = _heavy(seed, *shape)
    base = analyze_layer("w", w, metrics=ALL)
    scaled = analyze_layer("w", w * c, metrics=ALL)
    assert _close(scaled["norm"], base["norm"] * c * c, 1e-6)
    assert _close(scaled["spectral_norm"], base["spectral_norm"] * c * c, 1e-6)
    for m in ("alpha", "stable_rank", "entropy", "D"):
        assert _close(scaled[m], base[m], 1e-6), (m, scaled[m], base[m])


def test_identity_matrix():
    n = 64
    row = analyze_layer("eye", torch.eye(n), metrics=ALL)
    assert row["stable_rank"] == pytest.approx(n)
    assert row["entropy"] == pytest.approx(1.0)
    assert row["norm"] == pytest.approx(n)
    assert row["spectral_norm"] == pytest.approx(1.0)
    assert row["matrix_rank"] == n
    # Every eigenvalue equal: no power law to fit. NaN with a status, never -1.
    assert math.isnan(row["alpha"]) and row["status"] == "failed"
    assert "degenerate" in row["warning"]
    assert math.isnan(row["alpha_weighted"]) and math.isnan(row["log_alpha_norm"])


def test_rank_one_matrix():
    # Small integers: every product is exact in float32, so the matrix is exactly rank 1.
    u = torch.arange(1.0, 81.0)[:, None]
    v = torch.arange(-25.0, 25.0)[None, :]
    row = analyze_layer("r1", u @ v, metrics=ALL)
    assert row["matrix_rank"] == 1
    assert row["stable_rank"] == pytest.approx(1.0)
    assert row["entropy"] == 0.0
    lam = float((u.double() ** 2).sum() * (v.double() ** 2).sum())
    assert row["spectral_norm"] == pytest.approx(lam, rel=1e-9)
    assert row["status"] == "failed" and math.isnan(row["alpha"])


def test_known_rank_with_dead_channels():
    w = torch.randn(120, 90, generator=torch.Generator().manual_seed(0))
    w[:, 30:] = 0.0
    w[:10] = 0.0
    row = analyze_layer("dead", w, metrics=["entropy"])
    assert row["matrix_rank"] == np.linalg.matrix_rank(w.double().numpy()) == 30


def test_random_gaussian_is_far_from_heavy_tailed():
    w = torch.randn(1000, 500, generator=torch.Generator().manual_seed(0))
    row = analyze_layer("g", w, metrics=["alpha"])
    assert row["alpha"] > 6
    assert "under-trained" in row["warning"]


def test_alpha_matches_powerlaw_mle_at_fixed_xmin():
    """The oracle for the MLE: ``powerlaw.Fit(data, xmin=...)`` with a continuous power law."""
    powerlaw = pytest.importorskip("powerlaw")
    evals = eigenvalues(_heavy(5, 400, 300))
    x = evals[evals > 1e-5]
    fit = fit_power_law(evals, "median")
    xmin = float(x[x.numel() // 2])
    assert fit.xmin == xmin
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(x.numpy(), xmin=xmin, discrete=False, verbose=False)
    assert fit.alpha == pytest.approx(ref.power_law.alpha, rel=1e-9)
    # D by hand at that xmin.
    tail = x[x >= xmin].numpy()
    n = tail.size
    d = np.max(np.abs(1 - (tail / xmin) ** (1 - fit.alpha) - np.arange(n) / n))
    assert fit.D == pytest.approx(d, rel=1e-9)


def test_ww_scan_is_the_argmin_of_d_by_brute_force():
    evals = eigenvalues(_heavy(11, 200, 150))
    x = evals[evals > 1e-5].numpy()
    n = x.size
    best = (math.inf, None, None)
    for i in range(n - 1):
        tail = x[i:]
        a = 1 + tail.size / np.sum(np.log(tail / x[i]))
        d = np.max(np.abs(1 - (tail / x[i]) ** (1 - a) - np.arange(tail.size) / tail.size))
        if d < best[0]:
            best = (d, a, x[i])
    fit = fit_power_law(evals, "ww")
    assert fit.D == pytest.approx(best[0], rel=1e-9)
    assert fit.alpha == pytest.approx(best[1], rel=1e-9)
    assert fit.xmin == best[2]
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(int((x >= fit.xmin).sum())))


def test_peak_mode_scans_only_near_the_peak():
    evals = eigenvalues(_heavy(2, 300, 200))
    fit = fit_power_law(evals, "peak")
    x = evals[evals > 1e-5]
    logx = np.log10(x.numpy())
    counts, edges = np.histogram(logx, bins=100)
    p = 10 ** edges[np.argmax(counts)]
    assert 0.95 * p <= fit.xmin <= 1.5 * p


def test_clip_xmax_reports_fingers_and_raw_alpha():
    # A heavy-tailed bulk plus three huge outliers (fingers).
    evals = eigenvalues(_heavy(4, 300, 200))
    raw = fit_power_law(evals, "ww")
    fit = fit_power_law(evals, "clip-xmax")
    assert fit.extra["raw_alpha"] == pytest.approx(raw.alpha)
    assert 0 <= fit.extra["num_fingers"] <= 9
    if fit.extra["num_fingers"]:
        assert fit.alpha + 1.0 < raw.alpha
        assert fit.xmax < raw.xmax
    else:
        assert fit.alpha == raw.alpha


def test_failed_fit_is_nan_not_minus_one():
    fit = fit_power_law(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert fit.status == "failed" and math.isnan(fit.alpha) and math.isnan(fit.D)


def test_low_precision_weights_are_upcast():
    w = _heavy(9, 64, 48)
    for dtype in (torch.float16, torch.bfloat16):
        low = w.to(dtype)
        row = analyze_layer("w", low, metrics=["alpha", "norm"])
        ref = analyze_layer("w", low.to(torch.float64), metrics=["alpha", "norm"])
        assert row["norm"] == pytest.approx(ref["norm"], rel=1e-12)
        assert row["alpha"] == pytest.approx(ref["alpha"], rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = _heavy(3, 512, 384)
    conv = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    for weight in (w, conv):
        cpu = analyze_layer("w", weight, device="cpu")
        gpu = analyze_layer("w", weight, device="cuda")
        for m in ALL + ("rand_distance", "xmin", "D", "matrix_rank"):
            assert _close(gpu[m], cpu[m], 1e-6), (m, gpu[m], cpu[m])


@pytest.mark.parametrize("shape", [(700, 90), (90, 700), (40, 24, 3, 3), (24, 40, 5)])
def test_gram_summed_over_row_blocks_gives_the_squared_singular_values(monkeypatch, shape):
    """Large layers build their Gram from float64 row blocks (spectrum.GRAM_BLOCK_BYTES); a tiny
    block size forces many blocks. Oracle: numpy's SVD of each slice in float64."""
    from htsr_cli.engine import spectrum

    w = torch.randn(shape, generator=torch.Generator().manual_seed(11)) * 0.3
    mats = spectrum.slices(w).numpy().astype(np.float64)
    scale = 0.5 if w.ndim > 2 else 1.0
    expected = np.sort((np.linalg.svd(mats, compute_uv=False) ** 2).reshape(-1) * scale)
    for block in (8 * 7 * min(shape[:2]), 1 << 30):  # 7 rows per block; one block
        monkeypatch.setattr(spectrum, "GRAM_BLOCK_BYTES", block)
        got = eigenvalues(w).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected[-1])
