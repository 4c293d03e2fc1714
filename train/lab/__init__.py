"""The forgetting lab: what fine-tuning with FINCH or a baseline teaches a model, and what it makes it forget.

Data: :mod:`~train.lab.sources` (fetch + prepare), :mod:`~train.lab.quiz`, :mod:`~train.lab.facts`,
:mod:`~train.lab.tasks`. Measuring: :mod:`~train.lab.metrics`, :mod:`~train.lab.evaluate`. Comparing:
:mod:`~train.lab.config`, :mod:`~train.lab.methods`, :mod:`~train.lab.runner`, :mod:`~train.lab.front`,
:mod:`~train.lab.report`, :mod:`~train.lab.compare` and :mod:`~train.lab.demo`. See ``docs/lab.md``.
"""
