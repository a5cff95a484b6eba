"""The command line: one small module per subcommand, each a thin layer over the library."""

from htsr_cli.cli import allocate as _allocate  # noqa: F401
from htsr_cli.cli import analyze as _analyze  # noqa: F401  (registers the command)
from htsr_cli.cli import diff as _diff  # noqa: F401  (htsr diff, htsr plot diff)
from htsr_cli.cli import finetune as _finetune  # noqa: F401
from htsr_cli.cli import gate as _gate  # noqa: F401
from htsr_cli.cli import models as _models  # noqa: F401
from htsr_cli.cli import plot as _plot  # noqa: F401
from htsr_cli.cli import prune as _prune  # noqa: F401
from htsr_cli.cli.app import app, main

__all__ = ["app", "main"]
