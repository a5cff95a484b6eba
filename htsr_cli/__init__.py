"""htsr: Heavy-Tailed Self-Regularization metrics for neural-network checkpoints.

The library mirrors the CLI::

    import htsr_cli
    result = htsr_cli.analyze("model.safetensors", fit="ww", metrics=["alpha"])
    result.to_dict()          # the htsr.analysis/1 document

Attributes are imported lazily so that ``htsr --help`` does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "analyze": ("htsr_cli.engine.analysis", "analyze"),
    "analyze_layer": ("htsr_cli.engine.analysis", "analyze_layer"),
    "Analysis": ("htsr_cli.engine.analysis", "Analysis"),
    "open_checkpoint": ("htsr_cli.io.checkpoint", "open_checkpoint"),
    "fit_power_law": ("htsr_cli.engine.fit", "fit_power_law"),
    "METRICS": ("htsr_cli.engine.metrics", "METRICS"),
    "InputError": ("htsr_cli.errors", "InputError"),
    "HtsrError": ("htsr_cli.errors", "HtsrError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'htsr_cli' has no attribute {name!r}")
