"""The figures of ``htsr plot``: one function per figure, each writing a PNG, SVG or PDF
(by the output's extension, atomically) and returning the data it drew.

- :func:`plot_esd`: ESD of layers, log-log, with the fitted power law (checkpoint).
- :func:`plot_metrics`: one metric per layer (``htsr.analysis/1`` documents).
- :func:`plot_lr_plans`: LR multipliers in layer order and ranked (``htsr.lr-plan/1``).
- :func:`plot_prune_plans`: per-layer pruning ratio (``htsr.prune-plan/1``).
- :func:`plot_history`: curves of finetune runs (run directories).
- :func:`plot_tradeoff`: test accuracy against parameters remaining (run directories).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FORMATS": "common", "PALETTE": "common", "abbreviate": "common", "output_format": "common",
    "ESDPanel": "esd", "ESDPlot": "esd", "plot_esd": "esd", "power_law_line": "esd",
    "LayerPlot": "layers", "LayerSeries": "layers", "plot_lr_plans": "layers",
    "plot_metrics": "layers", "plot_prune_plans": "layers", "read_analysis": "layers",
    "read_prune_plan": "layers",
    "HistoryPlot": "runs", "RunHistory": "runs", "TradeoffLine": "runs", "TradeoffPlot": "runs",
    "plot_history": "runs", "plot_tradeoff": "runs", "read_final": "runs", "read_history": "runs",
}  # fmt: skip

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy: the figures from JSON documents never import torch (only plot_esd analyses).
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
