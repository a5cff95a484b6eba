"""``prune``: pruning budgets from the HT-SR metrics, applied to real models (docs/prune.md).

Public API::

    from htsr_cli.pruning import prune, load_pruned_model, read_prune_record
    plan = prune("model.safetensors", sparsity=0.5, structured=True, arch="resnet18",
                 output="pruned.safetensors")
    plan.to_dict()                    # the htsr.prune-plan/1 document
    model = load_pruned_model("pruned.safetensors")   # rebuilt from its pruning record
"""

from __future__ import annotations

from .api import ANALYZE_OPTIONS, prune
from .plan import PLAN_SCHEMA, GroupPlan, LayerPlan, PrunePlan, read_plan
from .record import (
    RECORD_KEY,
    RECORD_SCHEMA,
    load_pruned_model,
    read_prune_record,
    replay_history,
)
from .structured import IMPORTANCES

__all__ = ["prune", "PrunePlan", "LayerPlan", "GroupPlan", "PLAN_SCHEMA", "RECORD_KEY",
           "RECORD_SCHEMA", "IMPORTANCES", "ANALYZE_OPTIONS", "load_pruned_model",
           "read_prune_record", "read_plan", "replay_history"]
