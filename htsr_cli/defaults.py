"""Every default that both the command line and the library use, defined once.

Plain constants with no imports, so that the CLI reads them (for ``--help``) without loading
numpy or torch, and the library functions take the same values as their keyword defaults.
"""

from __future__ import annotations

#: analyze: layers with fewer eigenvalues are skipped (WeightWatcher's default).
ANALYZE_MIN_EVALS = 8
#: analyze: seed of rand_distance's shuffles (derived per layer from the name).
SEED = 0
#: The power-law fit of analyze and gates (WeightWatcher's).
FIT = "ww"
#: allocate and prune's metric method: layers with fewer eigenvalues keep the base LR / get the
#: average budget (TempBalance's 50; AlphaPruning has no threshold, see docs/presets.md).
PLAN_MIN_EVALS = 50
#: The fit of the on-the-fly analysis behind an LR plan: ``htsr allocate CKPT``, ``Reallocator``
#: and ``htsr finetune`` (TempBalance's ``xmin_mid``; an analysis document keeps its own fit).
PLAN_FIT = "median"
#: allocate: the smallest and largest multiplier of tb-linear and rank (TempBalance's).
S1, S2 = 0.5, 1.5
#: allocate --wd: AlphaDecay's weight-decay multiplier range.
WD_MIN_RATIO, WD_MAX_RATIO = 0.667, 3.0
#: prune: the half-width of AlphaPruning's linear mapping.
EPS = 0.2
#: prune: no layer (or coupled group) loses a larger fraction.
MAX_RATIO = 0.95
