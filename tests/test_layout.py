"""The tree's promises (docs/layout.md): the public API at its documented paths, old import
paths kept, no import cycle or private import across modules, and the commands that only read
JSON never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_public_api_paths() -> None:
    import htsr_cli
    import htsr_cli.optim as optim
    import htsr_cli.pruning as old_pruning
    from htsr_cli.models import build_model
    from htsr_cli.prune import load_pruned_model

    assert callable(htsr_cli.analyze) and htsr_cli.Analysis.__name__ == "Analysis"
    for name in ("param_groups", "Reallocator", "apply_multipliers", "layer_owners"):
        assert callable(getattr(optim, name)), name
    assert callable(build_model)
    # The old home of the pruning API still works and names the same objects.
    assert old_pruning.load_pruned_model is load_pruned_model
    from htsr_cli.pruning import prune, read_prune_record

    assert prune.__module__ == "htsr_cli.prune.api"
    assert read_prune_record.__module__ == "htsr_cli.prune.record"


def test_import_graph_has_no_cycle_and_no_private_import() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_imports.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 problem(s)" in proc.stderr


def test_the_import_checker_finds_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    """The checker itself, on a package made to break both rules."""
    pkg = tmp_path / "htsr_cli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from htsr_cli.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from htsr_cli import a\n_hidden = 1\n")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "check_imports.py").write_text((REPO / "scripts" / "check_imports.py").read_text())
    proc = subprocess.run(
        [sys.executable, str(scripts / "check_imports.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "imports the private name _hidden from htsr_cli.b" in proc.stdout
    assert "import cycle: htsr_cli.a -> htsr_cli.b" in proc.stdout


def test_plot_from_json_never_imports_torch(tmp_path: Path) -> None:
    from htsr_cli.allocate.schemes import allocate
    from htsr_cli.assets import default_checkpoint
    from htsr_cli.engine.analysis import analyze

    doc = analyze(str(default_checkpoint()), metrics=["alpha"], device="cpu").to_dict()
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "plan.json").write_text(json.dumps(allocate(doc, lr=0.1).to_dict()))
    code = (
        "import sys\n"
        "from htsr_cli.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    for args in (
        ["plot", "metrics", "a.json", "-o", "m.png"],
        ["plot", "lr-plan", "plan.json", "-o", "p.png"],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "False", (args, proc.stdout)
        assert (tmp_path / args[-1]).stat().st_size > 0


def test_finding_the_demo_checkpoint_loads_no_training_code() -> None:
    code = (
        "import sys\nfrom htsr_cli.assets import default_checkpoint\n"
        "assert default_checkpoint().is_file()\n"
        "print(sorted(m for m in sys.modules if m.startswith('htsr_cli.finetune')), "
        "'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] False"


@pytest.mark.parametrize(
    "module", ["htsr_cli.engine.columns", "htsr_cli.io.documents", "htsr_cli.prune.plan"]
)
def test_document_modules_are_torch_free(module: str) -> None:
    code = f"import sys, {module}\nprint('torch' in sys.modules, 'numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "False"
