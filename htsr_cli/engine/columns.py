"""Column names shared by every document and command (no heavy imports: the CLI reads
documents without loading torch)."""

from __future__ import annotations

from htsr_cli.io import schemas

#: The ten HT-SR metrics, named as WeightWatcher's columns (defined with the document).
METRICS: tuple[str, ...] = schemas.METRICS

#: Other numeric per-layer columns of an analysis.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "N", "M", "Q", "rf", "num_evals", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "matrix_rank",
)  # fmt: skip

#: alpha's well-trained band (thesis, WeightWatcher): below over-trained, above under-trained.
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0
