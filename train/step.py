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

from models import lora as lora_lib
from models import loss as loss_lib
from models import sharding as sharding_lib
from train import mesh as mesh_lib
from train.optimizers import applied_learning_rate, skip_metrics

__all__ = [
    "BATCH_KEYS",
    "TrainStep",
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
      frozen: a LoRA model's base weights (plain or quantized), read by every step and never updated; ``None``
        for full fine-tuning. Not checkpointed: a resumed run reloads the base from its source.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    anchor: Any
    rng: jax.Array
    frozen: Any = None


class ModelApply:
    """A ``models.CausalLM`` as pure functions of its params (an :data:`ApplyFn`, and a memory-lean loss).

    ``apply(params, tokens, positions, segment_ids)`` returns the fp32 logits; ``token_nll(params, batch)`` returns
    the per-token losses of the same forward without materialising them (:func:`models.loss.token_nll`).
    ``unroll_loss`` unrolls that loss's loop over chunks (same values): only for counting FLOPs (``train.compile``).

    A LoRA model's params are its adapters; its base weights are the ``frozen`` argument every method takes (an
    argument, never a constant of the compiled program: an 8B base must not be baked into it).
    """

    def __init__(
        self,
        graphdef: Any,
        rest: Any,
        *,
        has_frozen: bool = False,
        uses_dropout: bool = False,
        unroll_loss: bool = False,
    ):
        self._graphdef, self._rest = graphdef, rest
        self.has_frozen, self.uses_dropout = has_frozen, uses_dropout
        self.unroll_loss = unroll_loss

    def merge(self, params: Any, frozen: Any = None) -> Any:
        """The module with ``params`` (and a LoRA model's ``frozen`` base) in place (e.g. for generation)."""
        if not self.has_frozen:
            return nnx.merge(self._graphdef, params, self._rest)
        if frozen is None:
            raise ValueError("this model has LoRA adapters: pass its frozen base weights as well (state.frozen)")
        return nnx.merge(self._graphdef, params, frozen, self._rest)

    def __call__(
        self, params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, frozen: Any = None
    ) -> jax.Array:
        return self.merge(params, frozen)(tokens, positions=positions, segment_ids=segment_ids)

    def token_nll(
        self, params: Any, batch: Mapping[str, jax.Array], frozen: Any = None, rng: jax.Array | None = None
    ) -> jax.Array:
        """float32 ``[B, T]`` next-token losses, the LM head and cross-entropy run a chunk of positions at a time
        (``rng``: the key of the adapters' dropout, in training)."""
        model = self.merge(params, frozen)
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
        return loss_lib.token_nll(
            hidden, batch["targets"], model.logits, chunk_size=model.config.loss_chunk_size, unroll=self.unroll_loss
        )


# What a LoRA model keeps frozen: its weights and quantized kernels (the adapters, nnx.LoRAParam, are split first).
_FROZEN = (nnx.Param, lora_lib.QuantizedKernel)


def split_model(model: Any, *, unroll_loss: bool = False) -> tuple[ModelApply, Any, Any]:
    """Splits a flax NNX ``models.CausalLM`` into a pure apply function, the params training updates, and the rest.

    Returns:
      ``(apply_fn, params, frozen)``: ``apply_fn(params, tokens, positions, segment_ids, frozen) -> logits`` (a
      :class:`ModelApply`; ``apply_fn.merge(params, frozen)`` rebuilds a module); ``params`` a nested dict of the
      trained arrays: every ``nnx.Param``, or a LoRA model's adapters only; ``frozen`` a LoRA model's base weights
      (plain or quantized), ``None`` otherwise.
    """
    if lora_lib.has_lora(model):
        graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, _FROZEN, ...)
        apply_fn = ModelApply(
            graphdef, rest, has_frozen=True, uses_dropout=lora_lib.dropout_rate(model) > 0, unroll_loss=unroll_loss
        )
        return apply_fn, nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    return ModelApply(graphdef, rest, unroll_loss=unroll_loss), nnx.to_pure_dict(param_state), None


def token_loss_sums(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, jax.Array],
    frozen: Any = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sum_i w_i * nll_i, sum_i w_i)`` over one (micro-)batch, in fp32.

    A :class:`ModelApply` computes the losses chunk by chunk (no full fp32 logits), with a LoRA model's ``frozen``
    base and the adapters' dropout key ``rng``; any other ``apply_fn`` returns the logits, and the loss is taken
    from them.
    """
    if isinstance(apply_fn, ModelApply):
        nll = apply_fn.token_nll(params, batch, frozen, rng)
    else:
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def init_train_state(
    params: Any, tx: optax.GradientTransformation, *, seed: int = 0, l2sp: bool = False, frozen: Any = None
) -> TrainState:
    """A fresh state at step 0 (jit it with ``out_shardings`` to build it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        anchor=jax.tree.map(jnp.copy, params) if l2sp else None,
        rng=jax.random.key_data(jax.random.key(seed)),
        frozen=frozen,
    )


def train_state_shardings(
    abstract_state: TrainState, params_shardings: Any, mesh: Mesh, frozen_shardings: Any = None
) -> TrainState:
    """Shardings for every state leaf: params (and anchor, and a LoRA base) by the rules; optimizer state derived
    by path."""
    rep = mesh_lib.replicated(mesh)
    return TrainState(
        step=rep,
        params=params_shardings,
        opt_state=mesh_lib.state_shardings_like(
            abstract_state.opt_state, abstract_state.params, params_shardings, mesh
        ),
        anchor=None if abstract_state.anchor is None else params_shardings,
        rng=rep,
        frozen=frozen_shardings,
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


def _loss_and_grad_sums(apply_fn, params, frozen, batch, rng, grad_accum, mesh):
    # With a mesh, the model's activations are laid out explicitly (rows over data × fsdp), not left to XLA's guess.
    with sharding_lib.activation_sharding(None if mesh is None else mesh_lib.activation_context(mesh)):
        return _accumulate(apply_fn, params, frozen, batch, rng, grad_accum, mesh)


def _accumulate(apply_fn, params, frozen, batch, rng, grad_accum, mesh):
    # Gradients only for ``params`` (a LoRA model's adapters): the frozen base gets none, nor optimizer state.
    grad_fn = jax.value_and_grad(lambda p, b, key: token_loss_sums(apply_fn, p, b, frozen, key), has_aux=True)
    if grad_accum == 1:
        (loss_sum, weight_sum), grad_sum = grad_fn(params, batch, rng)
        return loss_sum, weight_sum, grad_sum

    micro = {k: _split_micro(v, grad_accum, mesh) for k, v in batch.items()}
    micro["key"] = None if rng is None else jax.random.split(rng, grad_accum)

    def body(carry, mb):
        loss_acc, weight_acc, grad_acc = carry
        key = mb.pop("key")
        (loss_sum, weight_sum), grads = grad_fn(params, mb, key)
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
        next_key, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        # Only LoRA dropout draws random numbers; a step without it keeps its program free of them.
        dropout_key = key if getattr(apply_fn, "uses_dropout", False) else None
        loss_sum, weight_sum, grad_sum = _loss_and_grad_sums(
            apply_fn, state.params, state.frozen, batch, dropout_key, grad_accum, mesh
        )
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
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            anchor=state.anchor,
            rng=jax.random.key_data(next_key),
            frozen=state.frozen,
        )
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
) -> TrainStep:
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
    return TrainStep(step_fn, mesh, state_shardings)


class TrainStep:
    """The jitted step: ``step(state, batch) -> (new_state, metrics)``, the input state donated.

    A LoRA model's frozen base (``state.frozen``) goes to the compiled program as an argument of its own that is
    neither donated nor returned: it is read in place every step, never copied, and the arrays it came from (e.g. a
    base model the caller keeps) stay valid.
    """

    def __init__(self, step_fn: Callable, mesh: Mesh | None, state_shardings: TrainState | None):
        def without_frozen(state: TrainState, batch: Mapping[str, jax.Array], frozen: Any):
            new_state, metrics = step_fn(state._replace(frozen=frozen), batch)
            return new_state._replace(frozen=None), metrics

        if mesh is None or state_shardings is None:
            self._jitted = jax.jit(without_frozen, donate_argnums=0)
        else:
            batch_sh = {k: mesh_lib.batch_sharding(mesh) for k in BATCH_KEYS}
            trained = state_shardings._replace(frozen=None)
            self._jitted = jax.jit(
                without_frozen,
                in_shardings=(trained, batch_sh, state_shardings.frozen),
                out_shardings=(trained, mesh_lib.replicated(mesh)),
                donate_argnums=0,
            )

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        new_state, metrics = self._jitted(state._replace(frozen=None), batch, state.frozen)
        return new_state._replace(frozen=state.frozen), metrics

    def _cache_size(self) -> int:
        """How many programs jit has compiled for this step (tests check that it never recompiles)."""
        return self._jitted._cache_size()

    def lower(self, state: TrainState, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The step lowered for ``state`` and ``batch`` (arrays or ``ShapeDtypeStruct``s)."""
        return self._jitted.lower(state._replace(frozen=None), batch, state.frozen)

    def compile(self, state: TrainState, batch: Mapping[str, Any]) -> Callable:
        """The compiled step as a ``(state, batch) -> (new_state, metrics)`` callable (compiled ahead of the call)."""
        compiled = self.lower(state, batch).compile()

        def run(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
            new_state, metrics = compiled(state._replace(frozen=None), batch, state.frozen)
            return new_state._replace(frozen=state.frozen), metrics

        run.compiled = compiled  # XLA's analyses (memory_analysis, cost_analysis, as_text)
        return run


def create_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    params_shardings: Any = None,
    seed: int = 0,
    l2sp: bool = False,
    frozen: Any = None,
    frozen_shardings: Any = None,
) -> tuple[TrainState, TrainState | None]:
    """Places ``params`` (and a LoRA model's ``frozen`` base) by their shardings and builds the initial state there
    (optimizer state created in place).

    Returns:
      ``(state, state_shardings)``; ``state_shardings`` is ``None`` without a mesh.
    """
    init = functools.partial(init_train_state, tx=tx, seed=seed, l2sp=l2sp)
    # The frozen base joins the state as it is placed, outside the jitted init: a copy of 16 GB would be a waste.
    if mesh is None:
        return jax.jit(init)(params)._replace(frozen=frozen), None
    abstract = jax.eval_shape(lambda p, f: init(p, frozen=f), params, frozen)
    shardings = train_state_shardings(abstract, params_shardings, mesh, frozen_shardings)
    params = jax.device_put(params, params_shardings)
    state = jax.jit(init, in_shardings=(params_shardings,), out_shardings=shardings._replace(frozen=None))(params)
    return state._replace(frozen=None if frozen is None else jax.device_put(frozen, frozen_shardings)), shardings


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
