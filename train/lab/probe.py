r"""The per-step retain probe: how much each single update moves the model on a few retain windows.

After every step it records :math:`\mathrm{KL}(\text{base}\,\|\,\theta_t)` and the step's own drift
:math:`\mathrm{KL}(\theta_{t-1}\,\|\,\theta_t)` per retain token. Plotted against :math:`\eta_t \sqrt{L_t}` (the
applied lr times the square root of the batch loss) it checks the premise of FINCH's forgetting bound, an SGD
argument, for the optimizer actually used (Adam normalises the gradient, SGD does not).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.lab.evalsets import EvalRows
from train.lab.metrics import token_kl
from train.step import ApplyFn

__all__ = ["RetainProbe"]


class RetainProbe:
    """Call :meth:`measure` with the params after each update (a ``finetune.run(on_step=...)`` hook does)."""

    def __init__(self, apply_fn: ApplyFn, base_params: Any, rows: EvalRows):
        batch = {k: jnp.asarray(v) for k, v in rows.rows.take(np.arange(len(rows))).items()}
        mask = batch["loss_mask"]

        @jax.jit
        def log_probs(params):
            logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
            return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

        @jax.jit
        def mean_kl(reference, current):
            return jnp.sum(token_kl(reference, current) * mask) / jnp.sum(mask)

        self._log_probs, self._mean_kl = log_probs, mean_kl
        self._base = log_probs(base_params)
        self._previous = self._base
        self.records: list[dict[str, float]] = []

    def measure(self, step: int, params: Any) -> None:
        current = self._log_probs(params)
        self.records.append(
            {
                "step": step,
                "kl_base": float(self._mean_kl(self._base, current)),
                "kl_step": float(self._mean_kl(self._previous, current)),
            }
        )
        self._previous = current
