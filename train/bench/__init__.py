"""The benchmark, ``python -m train bench`` (entry point :func:`train.bench.cli.main`; see ``docs/bench.md``).

:mod:`~train.bench.spec` the request · :mod:`~train.bench.run` one run · :mod:`~train.bench.sections` the sections ·
:mod:`~train.bench.jax_runner`, :mod:`~train.bench.torch_runner`, :mod:`~train.bench.peak` what is timed ·
:mod:`~train.bench.worker` runners in processes of their own · :mod:`~train.bench.stats` the timing arithmetic ·
:mod:`~train.bench.estimate` the duration estimate (FLOPs: :mod:`models.flops`) ·
:mod:`~train.bench.report` JSON and table. Nothing is imported here: a worker process starts with only what it needs.
"""
