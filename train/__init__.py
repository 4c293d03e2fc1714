"""The Flax NNX fine-tuning stack of finch-optax: sharded jit steps with FINCH, exact resume, multi-host, CLI.

Modules (imported on use, so ``python -m train --help`` stays fast):

* :mod:`train.config` — dataclass configs, YAML + ``key=value`` overrides.
* :mod:`train.optimizers` — ``make_optimizer(opt_cfg)``: ``finch_adamw`` (default), ``adamw``, ``finch_<direction>``.
* :mod:`train.mesh` — the ``(data, fsdp, tensor)`` mesh and the logical-axis sharding rules table.
* :mod:`train.step` — ``TrainState`` and the pure jit step with token-weighted accumulation.
* :mod:`train.data` — text/JSONL reading, tokenizing, packing, resumable order.
* :mod:`train.checkpoint` — orbax ``CheckpointManager`` save/restore into the target shardings.
* :mod:`train.metrics_log` — JSONL, TensorBoard and the progress bar.
* :mod:`train.finetune` — ``run(cfg, model=None, tokenizer=None)`` and the ``finetune`` subcommand.
* :mod:`train.generate`, :mod:`train.demo`, :mod:`train.distributed`, :mod:`train.cli`.
"""
