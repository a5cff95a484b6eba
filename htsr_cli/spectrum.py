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

import torch

#: Eigenvalues at or below this enter no power-law fit (WeightWatcher ``EVALS_THRESH``).
EVALS_THRESH = 1e-5

#: Squared singular-value scale applied to conv slices: (1/sqrt(2))**2.
CONV_EIG_SCALE = 0.5

# Below this fraction of lambda_max an eigenvalue from the Gram matrix is mostly rounding noise,
# so the rank is recounted from singular values.
_RANK_SUSPECT = 1e-10


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


def eigenvalues(weight: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pooled ESD of a layer: ascending float64 eigenvalues on ``device``, clamped at 0."""
    mats = slices(weight.to(device))
    evals = torch.linalg.eigvalsh(_gram(mats)).reshape(-1)
    if weight.ndim > 2:
        evals = evals * CONV_EIG_SCALE
    return torch.sort(evals.clamp_min(0.0)).values


def shuffled(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The weight with the entries of each slice randomly permuted (WeightWatcher's randomised
    ESD shuffles each slice on its own, which keeps every slice's Frobenius norm).

    The permutation is drawn on the CPU from ``generator`` so that a seed gives the same
    result on every device.
    """
    mats = slices(weight)
    rf, rows, cols = mats.shape
    flat = mats.reshape(rf, rows * cols)
    perm = torch.stack([torch.randperm(rows * cols, generator=generator) for _ in range(rf)])
    out = torch.gather(flat, 1, perm.to(flat.device)).reshape(rf, rows, cols)
    # Back to the original layout so that eigenvalues() slices it the same way.
    if weight.ndim == 2:
        return out[0]
    return out.permute(1, 2, 0).reshape(weight.shape)


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
    if float(evals[0]) > lam_max * _RANK_SUSPECT:
        return int(evals.numel())
    mats = slices(weight.to(evals.device)).to(torch.float64)
    sv = torch.linalg.svdvals(mats).reshape(-1) * scale**0.5
    tol = float(sv.max()) * geom.N * torch.finfo(torch.float64).eps
    return int((sv > tol).sum())
