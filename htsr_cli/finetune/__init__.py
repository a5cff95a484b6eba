"""``htsr finetune``: training with per-layer learning rates (docs/finetune.md).

The stages of a run, each in its module: :mod:`.config` (the arguments, args.json),
:mod:`.data` (data sets and batch transforms), :mod:`.setup` (model, device, first plan,
optimizer), :mod:`.loop` (the epochs), :mod:`.ddp` (torchrun and collectives),
:mod:`.run_dir` (the run directory) and :mod:`.api` (``finetune``/``run_finetune``).
"""
