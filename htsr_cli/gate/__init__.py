"""``htsr gate`` and ``htsr diff``: gating an analysis against thresholds and a baseline, and
the per-layer change between two analyses. Torch-free: a stored report is gated without
importing torch; a checkpoint is analysed (torch imported) only when one is given.

- :mod:`.sources`: an analysis from a stored document or a checkpoint, and the pairing of two.
- :mod:`.config`: ``[tool.htsr.gate]`` in pyproject.toml / ``[gate]`` in htsr.toml, found
  from the working directory upwards.
- :mod:`.render`: the gate report as text, JSON, GitHub workflow commands, JUnit XML, Markdown.
- :mod:`.run`: :func:`~htsr_cli.gate.run.run_gate`, the library function behind ``htsr gate``.
- :mod:`.diff`: :func:`~htsr_cli.gate.diff.run_diff`, behind ``htsr diff``.
"""
