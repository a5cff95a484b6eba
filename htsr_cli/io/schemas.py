"""Every versioned name htsr writes, defined once: the ``schema`` ids of its JSON documents
(``name/major``; docs/analysis-schema.md, docs/allocate.md, docs/prune.md, docs/finetune.md)
and the safetensors ``__metadata__`` keys of the checkpoints it writes.

Torch-free, so that readers of documents (``htsr plot``, ``htsr gate``) need nothing heavy.
"""

from __future__ import annotations

#: ``htsr analyze --format json``: per-layer metrics of one checkpoint.
ANALYSIS = "htsr.analysis/1"
#: ``htsr allocate``: per-layer learning-rate multipliers.
LR_PLAN = "htsr.lr-plan/1"
#: ``htsr prune``: per-layer pruning ratios, requested and achieved.
PRUNE_PLAN = "htsr.prune-plan/1"
#: The pruning record stored in a pruned checkpoint (under :data:`PRUNE_META`).
PRUNED_CHECKPOINT = "htsr.pruned-checkpoint/1"
#: ``htsr gate --format json``: the gate results of one model (docs/gates.md).
GATE_REPORT = "htsr.gate-report/1"
#: ``htsr diff --format json``: the per-layer change between two analyses (docs/gates.md).
DIFF = "htsr.diff/1"
#: A finetune run's final.json.
RUN = "htsr.run/1"
#: A finetune run's args.json.
RUN_ARGS = "htsr.run-args/1"
#: ``htsr models --format json``: the model zoo.
MODELS = "htsr.models/1"

#: The ten HT-SR metrics, the metric columns of an analysis (WeightWatcher's names).
METRICS: tuple[str, ...] = (
    "alpha",
    "rand_distance",
    "stable_rank",
    "entropy",
    "norm",
    "log_norm",
    "spectral_norm",
    "log_spectral_norm",
    "alpha_weighted",
    "log_alpha_norm",
)

#: safetensors metadata: the state dict's key (model) order, a JSON list.
KEY_ORDER_META = "htsr.key_order"
#: safetensors metadata: the pruning record (a JSON object of schema PRUNED_CHECKPOINT).
PRUNE_META = "htsr.prune"
#: safetensors metadata: a finetune run's epoch record in model.safetensors.
RUN_META = "htsr.run"
