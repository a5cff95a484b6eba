"""The command line: one small module per subcommand, each a thin layer over the library."""

from . import allocate as _allocate  # noqa: F401
from . import analyze as _analyze  # noqa: F401  (registers the command)
from . import finetune as _finetune  # noqa: F401
from . import plot as _plot  # noqa: F401
from . import prune as _prune  # noqa: F401
from .app import app, main

__all__ = ["app", "main"]
