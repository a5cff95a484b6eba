"""The figures of ``htsr plot``: one function per figure, each writing a PNG, SVG or PDF
(by the output's extension, atomically) and returning the data it drew.

- :func:`plot_esd`: ESD of layers, log-log, with the fitted power law (checkpoint).
- :func:`plot_metrics`: one metric per layer (``htsr.analysis/1`` documents).
- :func:`plot_lr_plans`: LR multipliers in layer order and ranked (``htsr.lr-plan/1``).
- :func:`plot_prune_plans`: per-layer pruning ratio (``htsr.prune-plan/1``).
- :func:`plot_history`: curves of finetune runs (run directories).
- :func:`plot_tradeoff`: test accuracy against parameters remaining (run directories).
"""

from .common import FORMATS, PALETTE, abbreviate, output_format
from .esd import ESDPanel, ESDPlot, plot_esd, power_law_line
from .layers import (
    LayerPlot,
    LayerSeries,
    plot_lr_plans,
    plot_metrics,
    plot_prune_plans,
    read_analysis,
    read_prune_plan,
)
from .runs import (
    HistoryPlot,
    RunHistory,
    TradeoffLine,
    TradeoffPlot,
    plot_history,
    plot_tradeoff,
    read_final,
    read_history,
)

__all__ = [
    "FORMATS", "PALETTE", "ESDPanel", "ESDPlot", "HistoryPlot", "LayerPlot", "LayerSeries",
    "RunHistory", "TradeoffLine", "TradeoffPlot", "abbreviate", "output_format", "plot_esd",
    "plot_history", "plot_lr_plans", "plot_metrics", "plot_prune_plans", "plot_tradeoff",
    "power_law_line", "read_analysis", "read_final", "read_history", "read_prune_plan",
]
