"""One-off maintainer script: write ``htsr_cli/assets/digits.npz`` from scikit-learn's bundled copy.

The UCI ML hand-written digits data set (E. Alpaydin and C. Kaynak, CC BY 4.0) ships inside
scikit-learn, so this needs no network. scikit-learn is *not* a dependency of the package; it is
only needed to (re)run this script::

    python scripts/make_digits_npz.py

The output holds ``images`` (uint8, (1797, 8, 8), values 0..16), ``labels`` (uint8, (1797,)) and a
fixed ``test_mask`` (bool, (1797,)): 20% of each class, drawn with ``numpy.random.default_rng(0)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "htsr_cli" / "assets" / "digits.npz"
TEST_FRACTION = 0.2


def make_test_mask(
    labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = 0
) -> np.ndarray:
    """Stratified test mask: round(fraction * n_c) samples of each class c, chosen at random."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * idx.size))
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def main() -> None:
    from sklearn.datasets import load_digits  # maintainer-only dependency

    bunch = load_digits()
    images = np.asarray(bunch.images)
    if not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 16):
        raise SystemExit("unexpected pixel values in the scikit-learn digits copy")
    images = images.astype(np.uint8)
    labels = np.asarray(bunch.target).astype(np.uint8)
    test_mask = make_test_mask(labels)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels, test_mask=test_mask)
    print(
        f"wrote {OUT} ({OUT.stat().st_size} bytes): images {images.shape} {images.dtype}, "
        f"labels {labels.shape}, test {int(test_mask.sum())} / train {int((~test_mask).sum())}"
    )


if __name__ == "__main__":
    main()
