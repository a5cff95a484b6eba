"""An analysis to gate or compare: a stored ``htsr.analysis/1`` document (read, never
recomputed, torch never imported) or a checkpoint (analysed here with analyze's options), and
the pairing of two analyses by layer name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htsr_cli.engine.columns import METRICS
from htsr_cli.engine.gates import is_nonfinite, pair_names
from htsr_cli.errors import InputError
from htsr_cli.io.documents import is_analysis_document, read_analysis
from htsr_cli.io.terminal import printable

#: Analysis options a checkpoint analysed beside a stored analysis takes from it, unless
#: given: so that the two are computed alike and their deltas mean something.
INHERITED_OPTIONS = ("fit", "min_evals", "seed", "layers", "exclude")
#: Options that change the numbers: a baseline analysed otherwise is warned about.
COMPARED_OPTIONS = ("fit", "min_evals", "evals_thresh")


@dataclass
class LoadedAnalysis:
    """One side of a gate or a diff."""

    doc: dict[str, Any]  # the htsr.analysis/1 document
    label: str  # how messages name it: the path, "stdin", or the checkpoint
    analysed: bool = False  # computed here from a checkpoint (else read from a document)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.doc.get("layers") or [])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [r for r in self.doc.get("skipped") or [] if isinstance(r, Mapping)]

    @property
    def names(self) -> list[str]:
        """Every layer name, analysed then skipped."""
        return [str(r.get("name", "")) for r in self.layers + self.skipped]

    @property
    def nonfinite(self) -> list[str]:
        return [str(r.get("name", "")) for r in self.skipped if is_nonfinite(r)]

    @property
    def metrics(self) -> list[str]:
        """The metrics the analysis computed, in canonical order."""
        listed = (self.doc.get("options") or {}).get("metrics")
        if isinstance(listed, list) and listed:
            return [m for m in METRICS if m in listed]
        return [m for m in METRICS if any(m in row for row in self.layers)]

    def describe(self) -> dict[str, Any]:
        """Where it came from, for reports: label, path, format, file digests."""
        src = self.doc.get("source") or {}
        return {
            "label": self.label,
            "analysed": self.analysed,
            "path": src.get("path"),
            "format": src.get("format"),
            "files": src.get("files"),
        }


def _read_document(source: Any, label: str) -> tuple[dict[str, Any], str]:
    # Every layer skipped (a diverged model) is a real analysis whose gates must fail, not an
    # unreadable one: allow_empty.
    if not isinstance(source, str | os.PathLike):
        return read_analysis(source, label, allow_empty=True)[0], label
    doc, file = read_analysis(source, allow_empty=True)
    return doc, file or label


def load_analysis(
    source: Any,
    *,
    label: str | None = None,
    options: Mapping[str, Any] | None = None,
    like: LoadedAnalysis | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> LoadedAnalysis:
    """The analysis behind ``source``: a document (a ``.json`` path, ``-``, a dict) is read and
    validated; anything else is a checkpoint, analysed with ``options`` (analyze's keyword
    arguments; None values left out), the options of ``like`` (a stored analysis it will be
    compared with) filling those not given.

    Raises:
        InputError: unreadable or invalid document, unreadable checkpoint, bad option.
    """
    name = label or ("stdin" if str(source) == "-" else printable(source))
    if is_analysis_document(source):
        doc, file = _read_document(source, name)
        return LoadedAnalysis(doc, label or file)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if like is not None and not like.analysed:
        stored = like.doc.get("options") or {}
        for key in INHERITED_OPTIONS:
            if key not in opts and stored.get(key) is not None:
                opts[key] = stored[key]
    from htsr_cli.engine.analysis import analyze  # the one torch import, for checkpoints only

    result = analyze(source, on_progress=on_progress, **opts)
    return LoadedAnalysis(result.to_dict(), name, analysed=True)


@dataclass
class Pairing:
    """Two analyses paired by layer name: ``common`` in the current model's order, ``added``
    (only in the current one), ``removed`` (only in the baseline)."""

    common: list[str]
    added: list[str]
    removed: list[str]
    warnings: list[str] = field(default_factory=list)


def pair(current: LoadedAnalysis, baseline: LoadedAnalysis) -> Pairing:
    """Pair by layer name; a baseline with no layer in common is an input error (comparing
    two unrelated models would pass every delta gate vacuously)."""
    common, added, removed = pair_names(current.names, baseline.names)
    if not common:
        sample = ", ".join(printable(n) for n in current.names[:3])
        base_sample = ", ".join(printable(n) for n in baseline.names[:3])
        raise InputError(
            f"{printable(current.label)} and the baseline {printable(baseline.label)} have no "
            f"layer name in common ({len(current.names)} layers, e.g. {sample}; baseline "
            f"{len(baseline.names)}, e.g. {base_sample}): not analyses of the same model"
        )
    return Pairing(common, added, removed, option_warnings(current, baseline))


def option_warnings(current: LoadedAnalysis, baseline: LoadedAnalysis) -> list[str]:
    """One warning per analysis option that differs between the two and changes the values."""
    mine, theirs = current.doc.get("options") or {}, baseline.doc.get("options") or {}
    out = []
    for key in COMPARED_OPTIONS:
        if key in mine and key in theirs and mine[key] != theirs[key]:
            out.append(
                f"{printable(baseline.label)} was analysed with {key}={printable(theirs[key])}, "
                f"{printable(current.label)} with {key}={printable(mine[key])}: their values "
                "are not computed alike"
            )
    return out


def check_sources(sources: Sequence[Any]) -> None:
    """Refuse reading stdin twice."""
    if sum(str(s) == "-" for s in sources if isinstance(s, str | Path)) > 1:
        raise InputError("'-' (stdin) can be given once: it can be read only once")


def load_pair(
    a: Any,
    b: Any,
    *,
    metrics: Sequence[str] | None = None,
    progress: bool | None = None,
    labels: tuple[str, str] = ("A", "B"),
    **analyze_options: Any,
) -> tuple[LoadedAnalysis, LoadedAnalysis]:
    """Both sides of a comparison (a diff, a gate against a baseline), after
    :func:`check_sources`: a stored side is read first, so that a checkpoint on the other side
    is analysed like it. ``labels`` name the sides on the progress bar."""
    from htsr_cli.io.terminal import ProgressBar

    check_sources([a, b])
    options: dict[str, Any] = {k: v for k, v in analyze_options.items() if v is not None}
    if metrics:
        options["metrics"] = list(metrics)
    sides: dict[str, LoadedAnalysis] = {}
    order = ("a", "b") if is_analysis_document(a) or not is_analysis_document(b) else ("b", "a")
    srcs: Mapping[str, Any] = {"a": a, "b": b}
    for key in order:
        other = sides.get("b" if key == "a" else "a")
        opts = dict(options)
        if other is not None and not other.analysed and "metrics" not in opts:
            opts["metrics"] = other.metrics  # compute what the stored side has, no more
        name = labels[0] if key == "a" else labels[1]
        with ProgressBar(f"analyze {name}", enabled=progress) as bar:
            sides[key] = load_analysis(
                srcs[key], options=opts, like=other, on_progress=bar.callback
            )
    return sides["a"], sides["b"]
