"""``run_gate``: the library function behind ``htsr gate`` (docs/gates.md).

Reads (or, for a checkpoint, computes) the analysis of a model and optionally of a baseline,
checks the gates of the command line and of the repository's configuration, and writes the
result in one of the CI formats. A stored report is gated without computing a spectrum and
without importing torch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from htsr_cli.engine.columns import METRICS
from htsr_cli.engine.gates import GateResult, evaluate_gates, parse_gate, require_metrics
from htsr_cli.errors import InputError
from htsr_cli.gate.config import GateConfig, resolve_config
from htsr_cli.gate.render import EXTENSIONS, FORMATS, WRITERS, markdown, safe, text_lines
from htsr_cli.gate.sources import (
    LoadedAnalysis,
    Pairing,
    check_sources,
    load_analysis,
    load_pair,
    pair,
)
from htsr_cli.io import schemas
from htsr_cli.io.documents import is_analysis_document
from htsr_cli.io.output import check_writable, dump_json, open_output
from htsr_cli.io.output import choose_format as output_format
from htsr_cli.io.terminal import ProgressBar

#: The environment variable GitHub Actions names its job-summary file with.
GITHUB_SUMMARY = "GITHUB_STEP_SUMMARY"


def choose_format(fmt: str | None, output: str | None, stdout_is_tty: bool) -> str:
    """``--format`` if given; else from the ``-o`` extension (.json, .xml = junit, .md =
    markdown, .txt = text; JSON otherwise); else text on a terminal and JSON in a pipe: the
    one rule of every command (:func:`htsr_cli.io.output.choose_format`) with gate's formats."""
    return output_format(
        fmt, output, stdout_is_tty, FORMATS, extensions=EXTENSIONS, terminal="text"
    )


def show_config(
    fail_if: Sequence[str] = (),
    baseline: Any = None,
    strict: bool | None = None,
    *,
    use_config: bool = True,
    cwd: str | os.PathLike | None = None,
    fmt: str | None = None,
    output: str | None = None,
) -> GateConfig:
    """``htsr gate --show-config``: what applies and where each setting comes from, as text
    (the default) or JSON (``--format json`` or a ``.json`` output); other formats are refused."""
    config = resolve_config(fail_if, baseline, strict, use_config=use_config, cwd=cwd)
    chosen = choose_format(fmt, output, stdout_is_tty=True)  # text unless asked or by -o
    if chosen not in ("text", "json"):
        raise InputError(f"--show-config prints text or json, not {chosen}")
    with open_output(output) as fh:
        if chosen == "json":
            dump_json(config.to_dict(), fh)
        else:
            fh.write("\n".join(config.lines()) + "\n")
    return config


@dataclass
class GateReport:
    """The outcome of :func:`run_gate`; ``to_dict()`` is the ``htsr.gate-report/1`` document."""

    source: LoadedAnalysis
    baseline: LoadedAnalysis | None
    config: GateConfig
    results: list[GateResult]
    pairing: Pairing | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.results if not g.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": schemas.GATE_REPORT,
            "passed": self.passed,
            "source": self.source.describe(),
            "baseline": self.baseline.describe() if self.baseline else None,
            "config": self.config.to_dict(),
            "gates": [g.to_dict() for g in self.results],
            "added": list(self.pairing.added) if self.pairing else [],
            "removed": list(self.pairing.removed) if self.pairing else [],
            "nonfinite": self.source.nonfinite,
            "skipped": [
                {"name": r.get("name"), "reason": r.get("reason")} for r in self.source.skipped
            ],
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 6),
        }


def _needed_metrics(gates: Sequence[Any]) -> list[str]:
    # alpha always: the fit behind xmin, D, ... is computed with it.
    wanted = {"alpha"} | {m for g in gates for m in g.metrics if m in METRICS}
    return [m for m in METRICS if m in wanted]


def _warn(text: str) -> None:
    sys.stderr.write(f"htsr: warning: {safe(text)}\n")


def run_gate(
    source: Any,
    *,
    fail_if: Sequence[str] = (),
    baseline: Any = None,
    strict: bool | None = None,
    use_config: bool = True,
    cwd: str | os.PathLike | None = None,
    fmt: str | None = None,
    output: str | None = None,
    progress: bool | None = None,
    **analyze_options: Any,
) -> GateReport:
    """Check gates on an analysis, optionally against a baseline, and write the report.

    Args:
        source: an analysis document (``.json`` path, ``-``, a dict) or a checkpoint.
        fail_if: gate expressions (docs/gates.md), added after the configuration's.
        baseline: an analysis document or a checkpoint to pair with by layer name; None
            takes the configuration's.
        strict: a glob that matches no layer is an error (None: the configuration's, else no).
        use_config: read ``[tool.htsr.gate]`` / ``htsr.toml`` from ``cwd`` upwards.
        fmt: text, json, github, junit or markdown; None chooses (:func:`choose_format`).
        output: a file (written atomically), ``-`` or None for stdout.
        progress: a progress bar while a checkpoint is analysed (None: on a terminal).
        analyze_options: :func:`~htsr_cli.engine.analysis.analyze`'s options for a
            checkpoint SOURCE or baseline (``metrics`` defaults to what the gates need).

    Returns:
        The report; the caller turns ``report.failed`` into exit 1.

    Raises:
        InputError: no gate, a malformed gate, an unreadable source, a baseline with no layer
            in common, a bad configuration; with strict, a glob matching no layer.
    """
    t0 = time.perf_counter()
    config = resolve_config(fail_if, baseline, strict, use_config=use_config, cwd=cwd)
    if not config.fail_if:
        raise InputError(
            "no gate to check: give --fail-if EXPR or fail-if in [tool.htsr.gate] "
            "(pyproject.toml) or [gate] (htsr.toml)"
        )
    gates = [parse_gate(g) for g in config.fail_if]  # malformed gates fail before any work
    base_src = config.baseline
    require_metrics(gates, METRICS, METRICS if base_src is not None else None)
    fmt = choose_format(fmt, output, sys.stdout.isatty())
    inputs = [s for s in (source, base_src) if s is not None]
    check_sources(inputs)
    check_writable(output, inputs)
    options = {k: v for k, v in analyze_options.items() if v is not None}
    options.setdefault("metrics", _needed_metrics(gates))
    warnings: list[str] = []
    if analyze_options and all(is_analysis_document(s) for s in inputs):
        given = ", ".join(sorted(k for k, v in analyze_options.items() if v not in (None, ())))
        if given:
            warnings.append(f"analysis options ({given}) apply to checkpoints only: ignored")

    base = None
    if base_src is not None:
        # A stored side is read first, so that a checkpoint on the other side (either one)
        # is analysed like it.
        base, current = load_pair(
            base_src, source, progress=progress, labels=("baseline", "model"), **options
        )
    else:
        with ProgressBar("analyze", enabled=progress) as bar:
            current = load_analysis(source, options=options, on_progress=bar.callback)
    pairing = pair(current, base) if base is not None else None
    if pairing:
        warnings += pairing.warnings
    results = evaluate_gates(
        gates,
        current.layers,
        skipped=current.skipped,
        baseline=base.layers if base else None,
        baseline_skipped=base.skipped if base else (),
        strict=config.strict,
        pairing=(pairing.added, pairing.removed) if pairing else None,  # paired once, above
    )
    warnings += [w for r in results for w in r.warnings]
    report = GateReport(current, base, config, results, pairing, warnings)
    report.seconds = time.perf_counter() - t0
    doc = report.to_dict()
    for w in warnings:
        _warn(w)
    with open_output(output) as fh:
        WRITERS[fmt](doc, fh)
    if output is not None and str(output) != "-":
        # The data went to a file: the person reading the log still sees the verdict.
        for line in text_lines(doc):
            sys.stderr.write(line + "\n")
    if fmt == "github" and os.environ.get(GITHUB_SUMMARY):
        append_summary(os.environ[GITHUB_SUMMARY], doc)
    return report


def append_summary(path: str, doc: Mapping[str, Any]) -> None:
    """Append the Markdown report to GitHub's job summary (appended: other steps write there
    too, so it is not replaced atomically)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(markdown(doc) + "\n")
    except OSError as exc:
        raise InputError(
            f"cannot append to ${GITHUB_SUMMARY} ({safe(path)}): {exc.strerror}"
        ) from None
