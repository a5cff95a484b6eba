"""Old home of :mod:`htsr_cli.prune`, kept so that ``from htsr_cli.pruning import ...`` keeps
working (``load_pruned_model``, ``prune``, ``read_prune_record``...)."""

from htsr_cli.prune import *  # noqa: F403
from htsr_cli.prune import __all__  # noqa: F401
