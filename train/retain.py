r"""Forgetting measured during a run: KL(base ‖ current) per retain token and the retain loss.

The retain text (``data.retain_files``: what the model should not forget) is packed into rows like the validation
data. At every evaluation the current model's distribution on those rows is compared with the base model's,

.. math::
  F = \frac{1}{N} \sum_t \sum_v p_\text{base}(v \mid x_{<t}) \,\bigl(\log p_\text{base}(v \mid x_{<t}) -
  \log p_\text{cur}(v \mid x_{<t})\bigr),

the lab's forgetting metric (``train/lab/metrics.py``). Where the base's distributions come from, without a second
copy of the model in memory:

* **LoRA runs**: the base *is* in memory — the current model with its adapters switched off (``B = 0``): the KL is
  exact, at the cost of a second forward pass per evaluation.
* **Full fine-tuning**: the base's distributions are computed once, before the first step, and kept on the devices
  as their ``top_k`` most likely tokens per position (ids and log-probabilities); the rest of the vocabulary is one
  lumped outcome, the mass the top ``k`` leave (``P`` for the base, ``Q`` for the current model):

  .. math::
    \hat F = \sum_{v \in \text{top}_k} p_v (\log p_v - \log q_v) + P \log \frac{P}{Q}.

  By the log-sum inequality the lumped term never exceeds the tail's true contribution, so :math:`\hat F \le F`: the
  estimate errs low, by at most the KL of the tail's two conditional distributions weighted by ``P``. With
  ``top_k = 0`` the whole distribution is kept (exact; ``positions × vocabulary × 4`` bytes). The error against the
  exact KL is measured in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import step as step_lib
from train.validation import host_scalar, padded_batches

__all__ = ["RetainEvaluator", "lumped_kl", "token_kl"]


def _log_probs(apply_fn: step_lib.ApplyFn, params: Any, frozen: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"], frozen)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_kl(base: jax.Array, current: jax.Array) -> jax.Array:
    """Exact per-position KL(base ‖ current) from two log-softmaxed ``[B, T, V]`` arrays."""
    return jnp.sum(jnp.exp(base) * (base - current), axis=-1)


def lumped_kl(base_top: jax.Array, top_ids: jax.Array, current: jax.Array) -> jax.Array:
    """Per-position KL(base ‖ current) from the base's top-``k`` log-probs ``[B, T, k]`` at ``top_ids``, the rest of
    the vocabulary lumped into one outcome (a lower bound of the exact KL; see the module docstring)."""
    cur_top = jnp.take_along_axis(current, top_ids, axis=-1)
    p, q = jnp.exp(base_top), jnp.exp(cur_top)
    head = jnp.sum(p * (base_top - cur_top), axis=-1)
    p_rest = jnp.clip(1.0 - jnp.sum(p, axis=-1), 0.0, 1.0)
    q_rest = jnp.clip(1.0 - jnp.sum(q, axis=-1), 1e-30, 1.0)
    tail = jnp.where(p_rest > 0, p_rest * (jnp.log(jnp.maximum(p_rest, 1e-30)) - jnp.log(q_rest)), 0.0)
    return head + tail


class RetainEvaluator:
    """``evaluator(params, frozen) -> {"retain_kl": ..., "retain_loss": ..., "retain_tokens": ...}``.

    Args:
      apply_fn: the model's pure apply function (:class:`train.step.ModelApply`).
      rows: the packed retain rows.
      batch_size: rows per forward pass (a multiple of the data-parallel size).
      to_device: host batch -> global device batch.
      base_params, frozen: the base model's params (a LoRA model's adapters switched off: zeros) and a LoRA model's
        frozen base; the base's distributions are computed from them here, once (full fine-tuning), or at every
        evaluation (LoRA, ``exact_base=True``: no copy of the model is kept).
      top_k: base tokens kept per position (0: the whole distribution).
      exact_base: recompute the base's distributions at every evaluation instead of keeping them.
    """

    def __init__(
        self,
        apply_fn: step_lib.ApplyFn,
        rows: data_lib.PackedRows,
        batch_size: int,
        to_device: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
        *,
        base_params: Any,
        frozen: Any = None,
        top_k: int = 64,
        exact_base: bool = False,
    ):
        self.rows, self.batch_size, self._to_device = rows, batch_size, to_device
        self.top_k, self.exact_base = top_k, exact_base
        self._base_params = base_params if exact_base else None

        self._references = None
        batches = [self._to_device(b) for b in padded_batches(self.rows, self.batch_size)] if not exact_base else []

        def sums(current, batch, reference):
            base_top, top_ids = reference
            kl = token_kl(base_top, current) if top_ids is None else lumped_kl(base_top, top_ids, current)
            nll = -jnp.take_along_axis(current, batch["targets"][..., None], axis=-1)[..., 0]
            weights = (batch["loss_mask"] > 0).astype(jnp.float32)
            return jnp.sum(kl * weights), jnp.sum(nll * weights), jnp.sum(weights)

        if exact_base:

            @jax.jit
            def score_exact(params, base_params, frozen, batch):
                current = _log_probs(apply_fn, params, frozen, batch)
                return sums(current, batch, (_log_probs(apply_fn, base_params, frozen, batch), None))

            self._score = lambda params, frozen, batch, i: score_exact(params, self._base_params, frozen, batch)
        elif top_k > 0 and batches:
            # One compiled program both takes the base's top-k (once, at the start, on the base params) and scores
            # against it: a second program would be a second compile of the whole forward pass, which on a CPU is
            # most of the retain KL's cost. Its reference input and output are laid out alike (rows over the batch
            # axes), so the call that computes the references and the calls that use them hit one executable.
            layout = _reference_layout(batches[0]["tokens"].sharding)

            @jax.jit
            def score_top_k(params, frozen, batch, reference):
                current = _log_probs(apply_fn, params, frozen, batch)
                top = jax.lax.top_k(current, top_k)
                return sums(current, batch, reference), tuple(jax.lax.with_sharding_constraint(t, layout) for t in top)

            shape = (*batches[0]["tokens"].shape, top_k)
            placeholder = tuple(jax.device_put(jnp.zeros(shape, d), layout) for d in (jnp.float32, jnp.int32))
            # XLA reports the output's layout in its own words (``P('fsdp')`` for ``P(('data', 'fsdp'), None, None)``
            # on this mesh): put the references in the placeholder's, which jit's cache compares by equality.
            self._references = [
                jax.device_put(score_top_k(base_params, frozen, b, placeholder)[1], layout) for b in batches
            ]
            self._score = lambda params, frozen, batch, i: score_top_k(params, frozen, batch, self._references[i])[0]
            self.programs = score_top_k  # one executable (tests count its compiles)
        else:

            @jax.jit
            def base_distribution(params, frozen, batch):
                return _log_probs(apply_fn, params, frozen, batch)

            @jax.jit
            def score_full(params, frozen, batch, base):
                return sums(_log_probs(apply_fn, params, frozen, batch), batch, (base, None))

            self._references = [base_distribution(base_params, frozen, b) for b in batches]
            self._score = lambda params, frozen, batch, i: score_full(params, frozen, batch, self._references[i])

    def __call__(self, params: Any, frozen: Any = None) -> dict[str, float]:
        kl = nll = tokens = 0.0
        for i, host_batch in enumerate(padded_batches(self.rows, self.batch_size)):
            kl_sum, nll_sum, weight = (
                host_scalar(x) for x in self._score(params, frozen, self._to_device(host_batch), i)
            )
            kl, nll, tokens = kl + kl_sum, nll + nll_sum, tokens + weight
        return {"retain_kl": kl / max(tokens, 1.0), "retain_loss": nll / max(tokens, 1.0), "retain_tokens": tokens}


def _reference_layout(tokens: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The base's ``[B, T, k]`` top-k laid out as the ``[B, T]`` tokens are, the last axis whole."""
    if isinstance(tokens, jax.sharding.NamedSharding):
        spec = tuple(tokens.spec) + (None,) * (3 - len(tokens.spec))
        return jax.sharding.NamedSharding(tokens.mesh, jax.sharding.PartitionSpec(*spec))
    return tokens
