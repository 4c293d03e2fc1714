"""The Flax NNX fine-tuning stack of finch-optax: sharded jit steps with FINCH, exact resume, multi-host, CLI.

Three rooms:

* ``train/`` — the fine-tuning stack: :mod:`~train.config` (dataclass configs, YAML + ``key=value``),
  :mod:`~train.optimizers` (optimizers by name), :mod:`~train.mesh` (mesh + logical-axis rules), :mod:`~train.step`
  (the pure jit step), :mod:`~train.data`, :mod:`~train.checkpoint`, :mod:`~train.metrics_log`,
  :mod:`~train.finetune` (``run(cfg)``) and :mod:`~train.session` (its loop), :mod:`~train.generate`,
  :mod:`~train.distributed`, :mod:`~train.cli`, :mod:`~train.malloc` (tcmalloc for XLA:CPU's steps).
* ``train/lab/`` — the forgetting lab: built-in datasets, evaluation, and the side-by-side ``compare``.
* ``train/bench/`` — the step-throughput benchmark.
"""
