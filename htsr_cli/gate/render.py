"""The gate report in the formats CI reads: text, JSON (``htsr.gate-report/1``), GitHub
workflow commands, JUnit XML and Markdown. Every string from a file (layer names, globs,
paths) is shown literally, control characters escaped."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from htsr_cli.io.output import dump_json
from htsr_cli.io.terminal import printable

FORMATS = ("text", "json", "github", "junit", "markdown")
#: ``-o`` extension -> format, when ``--format`` is not given.
EXTENSIONS = {".json": "json", ".xml": "junit", ".md": "markdown", ".txt": "text"}
_LISTED = 20  # layer names listed in a text/markdown line before "+N more"


def safe(text: Any) -> str:
    """Printable text that any UTF-8 writer accepts: controls escaped (``\\x1b``) and lone
    surrogates (which JSON allows in names) written as ``\\udxxx``."""
    return printable(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _listing(names: Sequence[str], limit: int = _LISTED) -> str:
    shown = ", ".join(safe(n) for n in names[:limit])
    return shown + (f", ... +{len(names) - limit} more" if len(names) > limit else "")


def summary_line(doc: Mapping[str, Any]) -> str:
    gates = doc["gates"]
    failed = sum(not g["passed"] for g in gates)
    if failed:
        return f"htsr gate: FAILED, {failed} of {len(gates)} gates"
    return f"htsr gate: passed, {len(gates)} of {len(gates)} gates"


def text_lines(doc: Mapping[str, Any]) -> list[str]:
    """One line per gate, then the layers on one side only, the skipped, the summary."""
    lines = [safe(g["message"]) for g in doc["gates"]]
    for key, what in (
        ("added", "layers only in this model"),
        ("removed", "layers only in the baseline"),
        ("nonfinite", "layers with NaN or infinite weights"),
    ):
        names = doc.get(key) or []
        if names:
            lines.append(f"{what} ({len(names)}): {_listing(names)}")
    lines.append(summary_line(doc))
    return lines


def write_text(doc: Mapping[str, Any], fh: TextIO) -> None:
    fh.write("\n".join(text_lines(doc)) + "\n")


def write_json(doc: Mapping[str, Any], fh: TextIO) -> None:
    dump_json(doc, fh)


def _gh_data(text: Any) -> str:
    # GitHub's escaping of a workflow command's message (actions/toolkit, command.ts).
    return safe(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: Any) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def github_lines(doc: Mapping[str, Any]) -> list[str]:
    """``::error`` per failing gate and offending layer, ``::warning`` per warning, plain
    lines for the rest (GitHub shows those in the log)."""
    lines = []
    for g in doc["gates"]:
        if g["passed"]:
            lines.append(safe(g["message"]))
            continue
        title = _gh_property(f"htsr gate: {g['gate'].strip()}")
        if g["offending"]:
            for o in g["offending"]:
                what = o.get("reason") or f"value {_value(o['value'])}"
                message = _gh_data(f"{o['name']}: {what}")
                lines.append(f"::error title={title}::{message}")
        else:
            lines.append(f"::error title={title}::{_gh_data(g['message'])}")
    for w in doc.get("warnings") or []:
        lines.append(f"::warning title=htsr gate::{_gh_data(w)}")
    for key, what in (("added", "only in this model"), ("removed", "only in the baseline")):
        names = doc.get(key) or []
        if names:
            lines.append(
                f"::notice title=htsr gate::{_gh_data(f'{len(names)} layers {what}: ')}"
                + _gh_data(_listing(names))
            )
    lines.append(summary_line(doc))
    return lines


def write_github(doc: Mapping[str, Any], fh: TextIO) -> None:
    fh.write("\n".join(github_lines(doc)) + "\n")


def _md_cell(text: Any) -> str:
    # A table cell: a backslash and a pipe would end or bend the cell; the rest is code.
    return safe(text).replace("\\", "\\\\").replace("|", "\\|")


def _md_code(text: Any) -> str:
    body = _md_cell(text)
    fence = "``" if "`" in body else "`"
    return f"{fence} {body} {fence}" if fence == "``" else f"`{body}`"


def markdown(doc: Mapping[str, Any]) -> str:
    """A heading, a table of the gates (result, gate, value, offending layers) and the
    layers on one side only: for PR comments and GitHub job summaries."""
    out = [f"### {summary_line(doc)}", ""]
    out.append("| result | gate | value | offending layers |")
    out.append("|---|---|---|---|")
    for g in doc["gates"]:
        result = "✅ ok" if g["passed"] else "❌ FAIL"
        offenders = ", ".join(
            f"{_md_code(o['name'])} ({_md_cell(o.get('reason') or _value(o['value']))})"
            for o in g["offending"][:_LISTED]
        )
        if len(g["offending"]) > _LISTED:
            offenders += f", ... +{len(g['offending']) - _LISTED} more"
        out.append(
            f"| {result} | {_md_code(g['gate'].strip())} | {_value(g['value'])} | {offenders} |"
        )
    for key, what in (
        ("added", "Layers only in this model"),
        ("removed", "Layers only in the baseline"),
        ("nonfinite", "Layers with NaN or infinite weights"),
    ):
        names = doc.get(key) or []
        if names:
            out += ["", f"{what} ({len(names)}): " + ", ".join(_md_code(n) for n in names)]
    for w in doc.get("warnings") or []:
        out += ["", f"> warning: {_md_cell(w)}"]
    return "\n".join(out) + "\n"


def write_markdown(doc: Mapping[str, Any], fh: TextIO) -> None:
    fh.write(markdown(doc))


def junit_xml(doc: Mapping[str, Any]) -> str:
    """One ``<testsuite>`` (inside ``<testsuites>``), one ``<testcase>`` per gate, a
    ``<failure>`` naming the offending layers and their values."""
    gates = doc["gates"]
    failures = sum(not g["passed"] for g in gates)
    seconds = f"{float(doc.get('seconds') or 0.0):.3f}"
    root = ET.Element(
        "testsuites", name="htsr gate", tests=str(len(gates)), failures=str(failures),
        errors="0", time=seconds,
    )  # fmt: skip
    suite = ET.SubElement(
        root, "testsuite", name="htsr gate", tests=str(len(gates)), failures=str(failures),
        errors="0", skipped="0", time=seconds,
    )  # fmt: skip
    props = ET.SubElement(suite, "properties")
    for key in ("source", "baseline"):
        side = doc.get(key)
        if side:
            ET.SubElement(props, "property", name=key, value=safe(side.get("label")))
    for g in gates:
        case = ET.SubElement(
            suite, "testcase", name=safe(g["gate"].strip()), classname="htsr.gate", time="0"
        )
        if not g["passed"]:
            failure = ET.SubElement(case, "failure", message=safe(g["message"]), type="gate")
            failure.text = "\n".join(
                f"{safe(o['name'])}: {safe(o.get('reason') or _value(o['value']))}"
                for o in g["offending"]
            ) or safe(g["message"])
    notes = [safe(w) for w in doc.get("warnings") or []]
    for key, what in (("added", "only in this model"), ("removed", "only in the baseline")):
        names = doc.get(key) or []
        if names:
            notes.append(f"{len(names)} layers {what}: {_listing(names, len(names))}")
    if notes:
        ET.SubElement(suite, "system-out").text = "\n".join(notes)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=False) + "\n"


def write_junit(doc: Mapping[str, Any], fh: TextIO) -> None:
    fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    fh.write(junit_xml(doc))


WRITERS = {
    "text": write_text,
    "json": write_json,
    "github": write_github,
    "junit": write_junit,
    "markdown": write_markdown,
}
