"""The analyze table's column choice (engine/report.py:choose_table_columns): the columns it
picks from widths measured once fit the terminal as rich renders them, and one more does not."""

from __future__ import annotations

import copy
import io

import pytest
from rich.console import Console

from htsr_cli.assets import default_checkpoint
from htsr_cli.engine.analysis import Analysis, analyze
from htsr_cli.engine.report import TABLE_PRIORITY, choose_table_columns, render_table


@pytest.fixture(scope="module")
def analyses() -> dict[str, Analysis]:
    demo = analyze(str(default_checkpoint()), seed=0)
    demo.source = {"path": "m"}  # a short title: every line past it is the table's
    quiet = copy.deepcopy(demo)
    for row in quiet.layers:
        row["warning"] = ""
    flagged = copy.deepcopy(demo)
    for i, row in enumerate(flagged.layers):
        row["name"] = f"encoder.layer.{i}.attention.query_key_value"
        row["warning"] = ("under-trained", "fit failed", "")[i % 3]
    return {"quiet": quiet, "flagged": flagged}


def rendered_width(analysis: Analysis, columns: list[str]) -> int:
    """The table's natural width as rich draws it (lines are padded to the table's width)."""
    buf = io.StringIO()
    render_table(analysis, Console(file=buf, width=10_000), columns=columns)
    table = buf.getvalue().splitlines()[1 : len(analysis.layers) + 5]  # header .. mean row
    return max(len(line) for line in table)


@pytest.mark.parametrize("kind", ["quiet", "flagged"])
def test_chosen_columns_fit_and_one_more_would_not(analyses, kind: str) -> None:
    analysis = analyses[kind]
    wanted = [c for c in TABLE_PRIORITY if c in {*analysis.metrics, "shape", "D", "num_evals"}]
    seen = set()
    for width in range(30, 231, 3):
        cols = choose_table_columns(analysis, width, Console(file=io.StringIO(), width=width))
        seen.add(len(cols))
        assert cols == wanted[: len(cols)] and len(cols) >= 2  # a prefix; shape, alpha always
        if len(cols) > 2:
            assert rendered_width(analysis, cols) <= width
        if len(cols) < len(wanted):
            assert rendered_width(analysis, wanted[: len(cols) + 1]) > width
    assert len(seen) > 5  # the widths range over many column sets, all of them checked
