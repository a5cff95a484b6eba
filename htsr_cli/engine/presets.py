"""The one registry of presets: every convention of a reference tool, quirks included.

``--preset tempbalance | alphapruning | weightwatcher`` (``preset=`` in Python) makes htsr compute
what that tool's own code computes, to float32 rounding, where htsr's defaults correct it.
htsr's corrected conventions stay the defaults; docs/presets.md tabulates every difference.

A preset only supplies defaults: an option given explicitly (``--fit peak``, ``--eps 0.2``)
wins, as long as the tool has it (TempBalance has no ``clip-xmax`` fit, say).

Pure data and torch-free, so that ``allocate`` reading an analysis document and the CLI's
``--help`` stay fast; :meth:`Preset.fit_conventions` imports the fit lazily.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from htsr_cli.errors import InputError

#: Commands a preset may apply to.
COMMANDS = ("analyze", "allocate", "prune", "finetune")

#: Names (last dotted component) of embedding tables in common checkpoints: GPT-2's wte/wpe,
#: BERT's *_embeddings, Llama's embed_tokens, T5's shared. A state dict does not say which 2-D
#: weight is an ``nn.Embedding``; the reference tools that skip embeddings see module types.
EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|\w*_embeddings|wte|wpe|shared)$")

#: Transformer blocks in layer names (AlphaPruning's ``block_wise`` unit): Llama/Mistral/OPT
#: ``model.layers.N.`` (and ``model.decoder.layers.N.``), BERT ``encoder.layer.N.``, GPT-2
#: ``h.N.``, timm ViT ``blocks.N.``. The block is the name up to and including the number.
BLOCK_PATTERN = r"^(.*?(?:^|\.)(?:layers|layer|h|blocks)\.\d+)\."


@dataclass(frozen=True)
class Preset:
    """One reference tool's conventions.

    Attributes:
        name: the ``--preset`` value.
        tool: the tool and version whose code the preset reproduces.
        commands: the commands it applies to (a tool that allocates no LRs has no allocate).
        fit: its default fit; ``fits`` the fit modes the tool has.
        filter_evals, small_sample, peak_bound, float32_window: the fit conventions
            (:class:`htsr_cli.engine.fit.FitConventions`).
        analyze_min_evals: the layers it fits (1: every layer, even one eigenvalue).
        max_evals, max_n: WeightWatcher skips layers with more pooled eigenvalues / a larger
            side (0: no limit).
        kinds: the layer kinds it analyses (``linear``, ``conv1d``, ``conv2d``).
        skip_embeddings: embedding tables are no ``nn.Linear``: not analysed.
        allocate: option defaults of ``allocate`` / ``finetune`` / ``Reallocator``.
        prune: option defaults of ``prune``.
    """

    name: str
    tool: str
    commands: tuple[str, ...]
    fit: str
    fits: tuple[str, ...]
    filter_evals: bool = True
    small_sample: bool = True
    peak_bound: str = "linear"
    float32_window: bool = False
    analyze_min_evals: int = 8
    max_evals: int = 0
    max_n: int = 0
    kinds: tuple[str, ...] = ("linear", "conv1d", "conv2d")
    skip_embeddings: bool = False
    allocate: Mapping[str, Any] = field(default_factory=dict)
    prune: Mapping[str, Any] = field(default_factory=dict)

    def fit_conventions(self) -> Any:
        """The :class:`~htsr_cli.engine.fit.FitConventions` of this tool (imports torch)."""
        from htsr_cli.engine.fit import FitConventions

        return FitConventions(
            filter_evals=self.filter_evals,
            small_sample=self.small_sample,
            peak_bound=self.peak_bound,
            float32_window=self.float32_window,
        )

    def skip_reason(self, name: str, shape: Sequence[int]) -> str:
        """Why the tool would not analyse this weight ("" when it would)."""
        kind = {2: "linear", 3: "conv1d", 4: "conv2d"}.get(len(shape), "")
        if kind and kind not in self.kinds:
            return f"{kind} layer: not in {self.tool}'s layer set (--preset {self.name})"
        if self.skip_embeddings and EMBEDDING_NAME.search(name):
            return f"embedding table: not in {self.tool}'s layer set (--preset {self.name})"
        if len(shape) >= 2:
            big, small = max(shape[0], shape[1]), min(shape[0], shape[1])
            rf = 1
            for d in shape[2:]:
                rf *= d
            if self.max_evals and small * rf > self.max_evals:
                return (
                    f"{small * rf} eigenvalues > max_evals {self.max_evals} (--preset {self.name})"
                )
            if self.max_n and big > self.max_n:
                return f"N = {big} > max_N {self.max_n} (--preset {self.name})"
        return ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tempbalance",
            tool="TempBalance",
            commands=("analyze", "allocate", "finetune"),
            # Tempbalance(pl_fitting='median'): 'goodness-of-fit' is a full argmin-D scan (ww),
            # 'fix-finger' the peak window.
            fit="median",
            fits=("median", "peak", "ww"),
            filter_evals=False,  # filter_zeros=False
            small_sample=False,
            peak_bound="log10",  # xmin_min = log10(0.95 * xmin2)
            float32_window=True,
            analyze_min_evals=1,  # net_esd_estimator fits every Conv2d/Linear
            kinds=("linear", "conv2d"),  # isinstance(m, (nn.Conv2d, nn.Linear))
            skip_embeddings=True,
            allocate={
                "scheme": "tb-linear",  # assign_func='tb_linear_map'
                "metric": "alpha",  # esd_metric_for_tb
                "s1": 0.5,  # lr_min_ratio
                "s2": 1.5,  # lr_max_ratio
                "min_evals": 50,  # eigs_thresh, counted over every eigenvalue
                "all_layers": False,  # remove_first_layer, remove_last_layer
                "fit": "median",
            },
        ),
        Preset(
            name="alphapruning",
            tool="AlphaPruning",
            commands=("analyze", "prune"),
            # The LLM default (main.py): --ww_metric alpha_peak, --epsilon 0.3,
            # --mapping_type block_wise.
            fit="peak",
            fits=("peak", "median", "ww"),
            filter_evals=False,
            small_sample=False,
            peak_bound="log10",
            float32_window=True,
            analyze_min_evals=1,
            kinds=("linear", "conv2d"),
            skip_embeddings=True,
            prune={
                "method": "metric",
                "metric": "alpha",
                "mapping": "linear",
                "more_where": "larger",
                "eps": 0.3,
                "block_wise": True,
                "min_evals": 0,  # no eigenvalue threshold: every layer's alpha is used
                "fit": "peak",
            },
        ),
        Preset(
            name="weightwatcher",
            tool="WeightWatcher 0.7.7",
            commands=("analyze",),
            # analyze() with its defaults: the argmin-D scan, EVALS_THRESH, the small-sample
            # estimator, min_evals 8, max_evals 15000, max_N 50000.
            fit="ww",
            fits=("ww", "clip-xmax"),
            analyze_min_evals=8,
            max_evals=15000,
            max_n=50000,
        ),
    )
}

NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str | None, command: str) -> Preset | None:
    """The preset called ``name`` for ``command`` (None for None).

    Raises:
        InputError: an unknown preset, or one that does not apply to ``command``.
    """
    if name is None:
        return None
    preset = PRESETS.get(str(name).strip().lower())
    if preset is None:
        raise InputError(f"unknown --preset {name!r}; choose from {', '.join(NAMES)}")
    if command not in preset.commands:
        users = [p.name for p in PRESETS.values() if command in p.commands]
        raise InputError(
            f"--preset {preset.name} does not apply to {command} ({preset.tool} has no "
            f"such step); presets for {command}: {', '.join(users) or 'none'}"
        )
    return preset


def check_fit(preset: Preset, fit: str) -> None:
    """Refuse a fit mode the tool does not have."""
    if fit not in preset.fits:
        raise InputError(
            f"--fit {fit} is not a mode of {preset.tool} (--preset {preset.name}); "
            f"choose from {', '.join(preset.fits)}"
        )


def fill(preset: Preset | None, section: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """``given`` with every None replaced by the preset's value from ``section`` (explicit
    options win)."""
    out = dict(given)
    if preset is None:
        return out
    for key, value in section.items():
        if out.get(key) is None:
            out[key] = value
    return out


def block_of(name: str, pattern: str | None = None) -> str | None:
    """The block a layer belongs to: the first group (else the whole match) of ``pattern``
    (default :data:`BLOCK_PATTERN`) searched in ``name``; None when it does not match."""
    try:
        rx = re.compile(pattern or BLOCK_PATTERN)
    except re.error as exc:
        raise InputError(
            f"--block-pattern {pattern!r} is not a regular expression: {exc}"
        ) from None
    m = rx.search(name)
    if m is None:
        return None
    return m.group(1) if rx.groups else m.group(0)


__all__ = [
    "COMMANDS",
    "EMBEDDING_NAME",
    "BLOCK_PATTERN",
    "Preset",
    "PRESETS",
    "NAMES",
    "get_preset",
    "check_fit",
    "fill",
    "block_of",
]
