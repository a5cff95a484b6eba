"""``allocate``: per-layer learning rates from the HT-SR metrics (docs/allocate.md).

:mod:`.schemes` (TempBalance's and the thesis's maps, :func:`~.schemes.allocate`),
:mod:`.plan` (the ``htsr.lr-plan/1`` document and its reader) and :mod:`.report` (what
``htsr allocate`` prints). Applying a plan to an optimizer is :mod:`htsr_cli.optim`.
"""
