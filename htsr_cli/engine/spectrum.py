"""From a weight tensor to its empirical spectral density (ESD): the pooled eigenvalues.

Conventions (docs/engine.md, reference section 1):

- A 2-D tensor is one matrix. N = larger side, M = smaller side.
- A Conv2d weight ``(out, in, kh, kw)`` is ``kh*kw`` slices ``W[:, :, i, j]``; a Conv1d weight
  ``(out, in, k)`` is ``k`` slices. Every slice is scaled by ``1/sqrt(2)`` (WeightWatcher's
  ``conv2d_norm``), i.e. every eigenvalue is halved. The eigenvalues of all slices are pooled.
- Eigenvalues are ``lambda = sigma**2`` of each (scaled) slice, with no ``1/N`` normalisation,
  computed as ``eigvalsh`` of the smaller Gram matrix in float64.

The Gram route is accurate to about ``1e-16 * lambda_max`` in absolute terms, which is plenty for
every metric but not for counting the rank of a rank-deficient layer: see :func:`matrix_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Eigenvalues at or below this enter no power-law fit (WeightWatcher ``EVALS_THRESH``).
EVALS_THRESH = 1e-5

#: Squared singular-value scale applied to conv slices: (1/sqrt(2))**2.
CONV_EIG_SCALE = 0.5

# Gram eigenvalues carry rounding noise of about M * eps * lambda_max; one within 100x of that
# may be a zero singular value, so the rank is then recounted from an SVD.
_RANK_NOISE_MARGIN = 100.0


@dataclass(frozen=True)
class LayerGeometry:
    """How a weight tensor is sliced into matrices."""

    kind: str  # "linear" | "conv1d" | "conv2d"
    N: int  # larger side of one slice
    M: int  # smaller side of one slice
    rf: int  # number of slices (receptive field)

    @property
    def Q(self) -> float:
        return self.N / self.M

    @property
    def num_evals(self) -> int:
        return self.M * self.rf


def geometry(shape: tuple[int, ...]) -> LayerGeometry | None:
    """The slicing of a weight of this shape, or None when it is not a layer we analyse."""
    if len(shape) == 2:
        kind, rf = "linear", 1
    elif len(shape) == 3:
        kind, rf = "conv1d", shape[2]
    elif len(shape) == 4:
        kind, rf = "conv2d", shape[2] * shape[3]
    else:
        return None
    out, inp = shape[0], shape[1]
    if min(out, inp, rf) == 0:
        return None
    return LayerGeometry(kind, max(out, inp), min(out, inp), rf)


def slices(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a batch of ``(rf, out, in)`` matrices, unscaled, in the weight's dtype."""
    if weight.ndim == 2:
        return weight.unsqueeze(0)
    # (out, in, *kernel) -> (out, in, rf) -> (rf, out, in)
    return weight.reshape(weight.shape[0], weight.shape[1], -1).permute(2, 0, 1)


def _gram(mats: torch.Tensor) -> torch.Tensor:
    """Gram matrices on the smaller side, float64."""
    m = mats.to(torch.float64)
    if m.shape[-2] >= m.shape[-1]:
        return m.mT @ m
    return m @ m.mT


#: Largest float64 block the CPU Gram product converts at once: a large layer's Gram is summed
#: over row blocks, so no float64 copy of the whole layer exists (peak memory ~ the float32 tensor
#: plus this). Blocks this size measured no slower than one product (docs/engine.md).
GRAM_BLOCK_BYTES = 32 << 20


def _gram_cpu(mats: np.ndarray) -> np.ndarray:
    """Float64 Gram matrices on the smaller side of each ``(a, b)`` matrix of ``(rf, a, b)``.

    Only the upper triangle is guaranteed (read it with ``eigvalsh(..., UPLO="U")``): a large
    layer's Gram is accumulated in place by BLAS ``dsyrk`` over float64 row blocks, which fills
    one triangle and needs no second Gram-sized buffer.
    """
    if mats.shape[1] < mats.shape[2]:
        mats = np.swapaxes(mats, 1, 2)  # contract over the longer side: (rf, long, short)
    rf, long, short = mats.shape
    if rf * long * short * 8 <= GRAM_BLOCK_BYTES:
        m = mats.astype(np.float64, copy=False)  # a shuffled layer may be float64 already
        return np.swapaxes(m, 1, 2) @ m  # one batched call for small layers (conv kernels)
    # Imported here: scipy.linalg costs ~0.3 s of start-up, which only layers this large need.
    from scipy.linalg.blas import dsyrk

    out = np.zeros((rf, short, short))
    rows = max(1, GRAM_BLOCK_BYTES // (8 * short))
    for s in range(rf):
        upper = out[s].T  # Fortran-ordered view: its lower triangle is out[s]'s upper one
        for r in range(0, long, rows):
            block = mats[s, r : r + rows].astype(np.float64)  # (k, short), C-ordered
            done = dsyrk(1.0, block.T, beta=1.0, c=upper, trans=0, lower=1, overwrite_c=1)
            if not np.shares_memory(done, upper):  # the wrapper copied after all: keep it
                upper[...] = done
    return out


class NonFiniteWeightError(ValueError):
    """The weight holds NaN or infinite entries (a diverged run): it has no spectrum."""


class SpectrumOverflowError(NonFiniteWeightError):
    """The weight is finite but so large that its eigenvalues (squared singular values)
    overflow float64: it has no spectrum either, and is skipped the same way."""


def eigenvalues(weight: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pooled ESD of a layer: ascending float64 eigenvalues on ``device``, clamped at 0.

    Raises :class:`NonFiniteWeightError` when the weight has NaN or infinite entries (checked
    on the small Gram matrix, where any such entry shows, instead of on the whole weight), and
    :class:`SpectrumOverflowError` (a subclass) when finite entries square past float64.

    On the CPU the Gram product and ``eigvalsh`` go through numpy's BLAS/LAPACK, measured ~1.5x
    faster than torch's CPU kernels here (benchmarks/analyze_vs_weightwatcher.py prints both
    lower bounds); mixing the two libraries' thread pools is slower than either, so both steps
    take the same route. Same formulas, same float64 results to rounding.
    """
    mats = slices(weight.to(device))
    if mats.device.type == "cpu":
        gram = torch.from_numpy(_gram_cpu(mats.numpy()))
    else:
        gram = _gram(mats)
    if not bool(torch.isfinite(gram).all()):
        if bool(torch.isfinite(weight).all()):  # finite entries, too large to square
            top = float(weight.detach().abs().max())
            raise SpectrumOverflowError(
                f"weight entries up to {top:.3g}: its eigenvalues overflow float64"
            )
        raise NonFiniteWeightError("weight has NaN or infinite entries")
    if gram.device.type == "cpu":
        evals = torch.from_numpy(np.linalg.eigvalsh(gram.numpy(), UPLO="U")).reshape(-1)
    else:
        evals = torch.linalg.eigvalsh(gram).reshape(-1)
    if weight.ndim > 2:
        evals = evals * CONV_EIG_SCALE
    return torch.sort(evals.clamp_min(0.0)).values


#: Layers (as float64 bytes) that :func:`shuffled` shuffles as float64: from 16 MiB (below,
#: where the float32 copy stays in cache, float32 measured as fast or faster) to 256 MiB
#: (above, the copy of a huge embedding would double in memory).
SHUFFLE_F64_MIN_BYTES = 16 << 20
SHUFFLE_F64_BYTES = 256 << 20


def shuffled(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The weight with the entries of each slice randomly permuted (WeightWatcher's randomised
    ESD shuffles each slice on its own, which keeps every slice's Frobenius norm).

    The shuffle runs on the CPU with numpy's generator seeded by ``seed`` (measured ~1.6x
    faster than torch's randperm + gather), so a seed gives the same matrix on every device.
    On the CPU the result is float64 between :data:`SHUFFLE_F64_MIN_BYTES` and
    :data:`SHUFFLE_F64_BYTES` (same values).
    """
    rng = np.random.default_rng(seed)
    src = slices(weight.detach().cpu()).numpy()  # (rf, out, in), a view
    # A C-ordered float64 copy for a layer of 2M to 32M entries: numpy's shuffle has a fast
    # path for 8-byte items (10-30% faster than 4-byte ones there, measured) and the Gram then
    # converts nothing. Same permutation of the same (exactly converted) values either way.
    wide = src.dtype == np.float64 or SHUFFLE_F64_MIN_BYTES <= src.size * 8 <= SHUFFLE_F64_BYTES
    mats = np.array(src, dtype=np.float64 if wide else src.dtype, order="C", copy=True)
    for flat in mats.reshape(mats.shape[0], -1):
        rng.shuffle(flat)
    out = torch.from_numpy(mats)
    # Back to the original layout so that eigenvalues() slices it the same way.
    out = out[0] if weight.ndim == 2 else out.permute(1, 2, 0).reshape(weight.shape)
    if weight.device.type != "cpu":  # float64 only helped the shuffle: move half the bytes
        out = out.to(weight.dtype)
    return out.to(weight.device)


def matrix_rank(weight: torch.Tensor, evals: torch.Tensor, geom: LayerGeometry) -> int:
    """WeightWatcher's ``matrix_rank`` over the pooled singular values: the count above
    ``sigma_max * N * eps64``.

    From ``eigvalsh`` the near-zero eigenvalues of a rank-deficient layer are rounding noise of
    size ~1e-16 * lambda_max, far above that tolerance once square-rooted, so when any eigenvalue
    is that small the singular values are recomputed with an SVD for this layer only.
    """
    lam_max = float(evals[-1]) if evals.numel() else 0.0
    if lam_max <= 0.0:
        return 0
    scale = CONV_EIG_SCALE if weight.ndim > 2 else 1.0
    noise = geom.M * torch.finfo(torch.float64).eps * lam_max
    if float(evals[0]) > _RANK_NOISE_MARGIN * noise:
        return int(evals.numel())
    mats = slices(weight.to(evals.device)).to(torch.float64)
    sv = torch.linalg.svdvals(mats).reshape(-1) * scale**0.5
    tol = float(sv.max()) * geom.N * torch.finfo(torch.float64).eps
    return int((sv > tol).sum())
