r"""The training step: a pure ``(state, batch) -> (state, metrics)`` function, jit-compiled with explicit shardings.

The loss is token-weighted cross-entropy. With per-token weights :math:`w_i` (``loss_mask``: 0 for padding and prompt
tokens, any float for STM-style down-weighting) over the whole global batch of :math:`k` micro-batches,

.. math::

  L = \frac{\sum_i w_i\, \ell_i}{\sum_i w_i}, \qquad
  g = \frac{\sum_{\text{micro}} \nabla \sum_{i \in \text{micro}} w_i\, \ell_i}{\sum_i w_i},

so accumulation sums token losses and gradients in fp32 under ``lax.scan`` and divides once by the total weight:
FINCH receives the true mean loss of the whole global batch as ``value`` (not the last micro-batch's, not a mean of
means). With ``l2sp_weight`` :math:`\lambda > 0` the objective gains :math:`\tfrac{\lambda}{2}\lVert\theta-\theta_0
\rVert^2` (:math:`\theta_0` = the starting params, kept in the state and never trained); FINCH still sees the task
loss :math:`L`, which is what its learning rate adapts to.

Mixed precision: params and optimizer state stay in their storage dtype (fp32); the model computes in its ``dtype``
(bf16) and returns fp32 logits; losses and gradient sums are fp32. For a model split by :func:`split_model` the loss
is computed from the final hidden states a chunk of positions at a time (:func:`models.loss.token_nll`), so the fp32
``[B, T, vocab]`` logits of the whole batch never exist at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import loss as loss_lib
from models import sharding as sharding_lib
from train import mesh as mesh_lib
from train.optimizers import applied_learning_rate, skip_metrics

__all__ = [
    "BATCH_KEYS",
    "ApplyFn",
    "ModelApply",
    "TrainState",
    "abstract_like",
    "create_train_state",
    "host_batch_arrays",
    "init_train_state",
    "make_step_fn",
    "make_train_step",
    "split_model",
    "token_loss_sums",
    "train_state_shardings",
]

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")

# (params, tokens, positions, segment_ids) -> float32 logits [B, T, vocab]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree, checkpointed as a whole.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      params: the trained params (a nested dict of arrays in the storage dtype).
      opt_state: the optax state (FINCH's EMA loss, lr and counters included).
      anchor: the starting params for L2-SP (not trained), or ``None`` when ``l2sp_weight == 0``.
      rng: uint32[2] raw PRNG key data, split every step (for stochastic layers; checkpointed for exact resume).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    anchor: Any
    rng: jax.Array


class ModelApply:
    """A ``models.CausalLM`` as pure functions of its params (an :data:`ApplyFn`, and a memory-lean loss).

    ``apply(params, tokens, positions, segment_ids)`` returns the fp32 logits; ``token_nll(params, batch)`` returns
    the per-token losses of the same forward without materialising them (:func:`models.loss.token_nll`).
    ``unroll_loss`` unrolls that loss's loop over chunks (same values): only for counting FLOPs (``train.compile``).
    """

    def __init__(self, graphdef: Any, rest: Any, *, unroll_loss: bool = False):
        self._graphdef, self._rest = graphdef, rest
        self.unroll_loss = unroll_loss

    def merge(self, params: Any) -> Any:
        """The module with ``params`` in place (e.g. for generation)."""
        return nnx.merge(self._graphdef, params, self._rest)

    def __call__(self, params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.merge(params)(tokens, positions=positions, segment_ids=segment_ids)

    def token_nll(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """float32 ``[B, T]`` next-token losses, the LM head and cross-entropy run a chunk of positions at a time."""
        model = self.merge(params)
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        return loss_lib.token_nll(
            hidden, batch["targets"], model.logits, chunk_size=model.config.loss_chunk_size, unroll=self.unroll_loss
        )


def split_model(model: Any, *, unroll_loss: bool = False) -> tuple[ModelApply, Any, Callable[[Any], Any]]:
    """Splits a flax NNX ``models.CausalLM`` into a pure apply function, its params dict and a re-merge function.

    Returns:
      ``(apply_fn, params, merge)``: ``apply_fn(params, tokens, positions, segment_ids) -> logits`` (a
      :class:`ModelApply`); ``params`` a nested dict of the ``nnx.Param`` arrays; ``merge(params) -> model``
      rebuilds a module (e.g. for generation).
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = ModelApply(graphdef, rest, unroll_loss=unroll_loss)
    return apply_fn, nnx.to_pure_dict(param_state), apply_fn.merge


def token_loss_sums(apply_fn: ApplyFn, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(sum_i w_i * nll_i, sum_i w_i)`` over one (micro-)batch, in fp32.

    A :class:`ModelApply` computes the losses chunk by chunk (no full fp32 logits); any other ``apply_fn`` returns
    the logits, and the loss is taken from them.
    """
    if isinstance(apply_fn, ModelApply):
        nll = apply_fn.token_nll(params, batch)
    else:
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def init_train_state(params: Any, tx: optax.GradientTransformation, *, seed: int = 0, l2sp: bool = False) -> TrainState:
    """A fresh state at step 0 (jit it with ``out_shardings`` to build it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        anchor=jax.tree.map(jnp.copy, params) if l2sp else None,
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def train_state_shardings(abstract_state: TrainState, params_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings for every state leaf: params (and anchor) by the rules; optimizer state derived by path."""
    rep = mesh_lib.replicated(mesh)
    return TrainState(
        step=rep,
        params=params_shardings,
        opt_state=mesh_lib.state_shardings_like(
            abstract_state.opt_state, abstract_state.params, params_shardings, mesh
        ),
        anchor=None if abstract_state.anchor is None else params_shardings,
        rng=rep,
    )


def _split_micro(x: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, ... so every device keeps its local rows."""
    b = x.shape[0]
    x = x.reshape(b // k, k, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2))))
        )
    return x


def _loss_and_grad_sums(apply_fn, params, batch, grad_accum, mesh):
    # With a mesh, the model's activations are laid out explicitly (rows over data × fsdp), not left to XLA's guess.
    with sharding_lib.activation_sharding(None if mesh is None else mesh_lib.activation_context(mesh)):
        return _accumulate(apply_fn, params, batch, grad_accum, mesh)


def _accumulate(apply_fn, params, batch, grad_accum, mesh):
    grad_fn = jax.value_and_grad(lambda p, b: token_loss_sums(apply_fn, p, b), has_aux=True)
    if grad_accum == 1:
        (loss_sum, weight_sum), grad_sum = grad_fn(params, batch)
        return loss_sum, weight_sum, grad_sum

    micro = {k: _split_micro(v, grad_accum, mesh) for k, v in batch.items()}

    def body(carry, mb):
        loss_acc, weight_acc, grad_acc = carry
        (loss_sum, weight_sum), grads = grad_fn(params, mb)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        return (loss_acc + loss_sum, weight_acc + weight_sum, grad_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, weight_sum, grad_sum), _ = jax.lax.scan(body, init, micro)
    return loss_sum, weight_sum, grad_sum


def make_step_fn(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    l2sp_weight: float = 0.0,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted pure step (see :func:`make_train_step`)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {k: batch[k] for k in BATCH_KEYS}
        loss_sum, weight_sum, grad_sum = _loss_and_grad_sums(apply_fn, state.params, batch, grad_accum, mesh)
        denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
        metrics: dict[str, jax.Array] = {}
        if l2sp_weight > 0:
            diff = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), state.params, state.anchor)
            sq = sum(jnp.sum(d * d) for d in jax.tree.leaves(diff))
            grads = jax.tree.map(lambda g, d: (g + l2sp_weight * d).astype(g.dtype), grads, diff)
            metrics["l2sp"] = 0.5 * l2sp_weight * sq
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        lr = applied_learning_rate(opt_state)
        metrics.update(
            loss=loss,
            tokens=jnp.sum((batch["segment_ids"] != 0).astype(jnp.int32)),
            loss_tokens=jnp.sum((batch["loss_mask"] > 0).astype(jnp.int32)),
            loss_weight=weight_sum,
            grad_norm=grad_norm,
            lr=lr,
            lr_sqrt_loss=lr * jnp.sqrt(jnp.maximum(loss, 0.0)),
        )
        metrics.update(skip_metrics(opt_state))  # the divergence guard's counters (train.guard reads them)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, anchor=state.anchor, rng=rng)
        return new_state, metrics

    return step_fn


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    l2sp_weight: float = 0.0,
    mesh: Mesh | None = None,
    state_shardings: TrainState | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jit-compiled step: pure ``(state, batch) -> (new_state, metrics)``, the input state donated.

    Args:
      apply_fn: ``(params, tokens, positions, segment_ids) -> fp32 logits`` (see :func:`split_model`).
      tx: the optimizer (:func:`train.optimizers.make_optimizer`); updated with ``value=`` the global mean loss.
        The applied learning rate is read back from its state (:func:`train.optimizers.applied_learning_rate`).
      grad_accum: number of micro-batches the global batch is split into (rows must divide evenly).
      l2sp_weight: λ of the L2-SP penalty toward ``state.anchor`` (0 = off).
      mesh, state_shardings: when given, explicit in/out shardings (batch over ``data``×``fsdp``, metrics
        replicated); otherwise jit places everything on the default device.

    Returns:
      ``step(state, batch)``; ``batch`` holds int32 ``tokens``, ``targets``, ``positions``, ``segment_ids`` and
      float32 ``loss_mask``, all ``[global_batch, seq_len]``. Metrics (fp32/int32 scalars): ``loss``, ``tokens``
      (non-padding tokens processed), ``loss_tokens`` (tokens with weight > 0), ``loss_weight`` (sum of weights), ``grad_norm``, ``lr`` (the rate the update used), ``lr_sqrt_loss``, ``l2sp`` when on, and with
      :func:`train.optimizers.make_optimizer`'s optimizer ``skipped`` / ``consecutive_skips`` (steps skipped for a
      NaN/inf loss or gradient: in all, and in a row up to this one; params and optimizer state are untouched by a
      skipped step).
    """
    step_fn = make_step_fn(apply_fn, tx, grad_accum=grad_accum, l2sp_weight=l2sp_weight, mesh=mesh)
    if mesh is None or state_shardings is None:
        return jax.jit(step_fn, donate_argnums=0)
    batch_sh = {k: mesh_lib.batch_sharding(mesh) for k in BATCH_KEYS}
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )


def create_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    params_shardings: Any = None,
    seed: int = 0,
    l2sp: bool = False,
) -> tuple[TrainState, TrainState | None]:
    """Places ``params`` by their shardings and builds the initial state there (optimizer state created in place).

    Returns:
      ``(state, state_shardings)``; ``state_shardings`` is ``None`` without a mesh.
    """
    init = functools.partial(init_train_state, tx=tx, seed=seed, l2sp=l2sp)
    if mesh is None:
        return jax.jit(init)(params), None
    abstract = jax.eval_shape(init, params)
    shardings = train_state_shardings(abstract, params_shardings, mesh)
    params = jax.device_put(params, params_shardings)
    state = jax.jit(init, in_shardings=(params_shardings,), out_shardings=shardings)(params)
    return state, shardings


def abstract_like(state_shardings: TrainState, abstract_state: TrainState) -> TrainState:
    """``ShapeDtypeStruct``s carrying the target shardings (the restore target for checkpoints)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
    )


def host_batch_arrays(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Casts a host batch to the step's dtypes (int32 ids, float32 weights)."""
    out = {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS if k != "loss_mask"}
    out["loss_mask"] = np.asarray(batch["loss_mask"], np.float32)
    return out
