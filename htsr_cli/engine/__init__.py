"""The HT-SR engine, in pipeline order: :mod:`.spectrum` (weights to eigenvalues), :mod:`.fit`
(the power-law fit), :mod:`.metrics` (the ten metrics), :mod:`.analysis` (the layer walk and
:func:`~htsr_cli.engine.analysis.analyze`), :mod:`.gates` (``--fail-if``) and :mod:`.report`
(what ``htsr analyze`` prints). :mod:`.columns` names the columns without importing torch."""
