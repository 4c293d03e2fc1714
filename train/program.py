"""The train program, built in one place: config + model → mesh, rules, optimizer, shardings, state, jitted step.

``finetune`` trains with it, ``compile`` lowers it for a TPU pod with abstract weights, ``bench`` times it, and
``export`` restores checkpoints into its state layout. Whatever changes how the step or its state is built (a new
optimizer, adapters, another sharding rule) changes here, once::

    model, tokenizer = load_model(cfg.model)              # with LoRA adapters when cfg.model.lora.rank > 0
    program, params, frozen = build_program(cfg, model)   # or an abstract model: arrays become ShapeDtypeStructs
    state = program.init_state(params, frozen)
    state, metrics = program.step(state, program.place_batch(host_batch))
    compiled = program.lower().compile()                   # AOT: abstract state and batch, no weights needed
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import models
from models import lora as lora_lib
from models.config import ModelConfig
from train import data as data_lib
from train import mesh as mesh_lib
from train import step as step_lib
from train.config import ConfigError, ModelSettings, TrainConfig
from train.optimizers import make_optimizer

__all__ = [
    "TrainProgram",
    "abstract_model",
    "lora_spec",
    "with_adapters",
    "build_program",
    "check_batch",
    "load_model",
    "model_config",
    "model_fields",
    "place_batch",
    "preflight",
]


def model_fields(settings: ModelSettings) -> dict[str, Any]:
    """The :func:`models.load` keyword arguments ``settings`` asks for (precision, remat, scan, attention)."""
    return dict(
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        remat=settings.remat,
        remat_policy=settings.remat_policy,
        scan_layers=settings.scan_layers,
        attention_impl=settings.attention_impl,
    )


def lora_spec(settings: ModelSettings) -> lora_lib.LoraSpec | None:
    """The adapters ``settings.lora`` asks for (``None``: full fine-tuning)."""
    s = settings.lora
    if not s.enabled:
        return None
    return lora_lib.LoraSpec(
        rank=s.rank,
        alpha=s.alpha,
        targets=s.targets,
        dropout=s.dropout,
        rslora=s.rslora,
        quantize=s.quantize,
        block=s.block,
    )


def with_adapters(model: Any, settings: ModelSettings) -> Any:
    """``model`` with the LoRA adapters (and quantized base) ``settings.lora`` asks for, in place; returns it."""
    spec = lora_spec(settings)
    if spec is None:
        return model
    lora_lib.add_lora(model, spec, seed=settings.init_seed)
    return lora_lib.quantize_base(model, spec)


def load_model(settings: ModelSettings, *, adapters: bool = True, **overrides: Any) -> tuple[Any, Any]:
    """The model and tokenizer ``settings.source`` names (see :func:`models.load`), at the configured precision,
    with the LoRA adapters ``settings.lora`` asks for (unless ``adapters=False``: the base alone).

    ``overrides`` replace :func:`model_fields` entries (e.g. ``dtype="float32"`` for generation on a CPU).
    """
    fields = model_fields(settings) | overrides
    model, tokenizer = models.load(settings.source, seed=settings.init_seed, **fields)
    return (with_adapters(model, settings) if adapters else model), tokenizer


def model_config(settings: ModelSettings, **overrides: Any) -> ModelConfig:
    """The :class:`models.ModelConfig` ``settings.source`` names, read without loading any weight."""
    return models.load_config(settings.source, **(model_fields(settings) | overrides))


def abstract_model(settings: ModelSettings, model_cfg: ModelConfig | None = None) -> Any:
    """The model ``settings`` describe (adapters and quantized base included) as shapes only: no weight in memory,
    for ahead-of-time compiles. ``model_cfg`` replaces the one ``settings.source`` names."""
    model_cfg = model_config(settings) if model_cfg is None else model_cfg
    return nnx.eval_shape(lambda: with_adapters(models.CausalLM(model_cfg, rngs=nnx.Rngs(0)), settings))


def check_batch(cfg: TrainConfig, mesh: Mesh) -> int:
    """Rows per data-parallel device per micro-batch; a :class:`ConfigError` when the batch does not divide."""
    dp = mesh_lib.data_parallel_size(mesh)
    d = cfg.data
    if d.batch_size % (d.grad_accum * dp):
        raise ConfigError(
            f"data.batch_size={d.batch_size} does not divide into data.grad_accum={d.grad_accum} micro-batches over "
            f"{dp} data-parallel devices (mesh data={mesh.shape['data']} × fsdp={mesh.shape['fsdp']}); use a "
            f"multiple of {d.grad_accum * dp}"
        )
    return d.batch_size // (d.grad_accum * dp)


def preflight(cfg: TrainConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The checks of :func:`build_program` that need no model (mesh, batch, rules, optimizer), to run before a
    model is loaded; returns the mesh."""
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    check_batch(cfg, mesh)
    mesh_lib.parse_rules(cfg.mesh.rules)
    make_optimizer(cfg.optimizer, total_steps=cfg.steps)
    return mesh


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything the train step is made of, derived from one config and one model.

    Attributes:
      config: the run's config.
      mesh: the ``(data, fsdp, tensor)`` device mesh.
      optimizer: the optax transformation (:func:`train.optimizers.make_optimizer`).
      apply_fn: the model as pure functions of its params (:class:`train.step.ModelApply`).
      params_shardings: a ``NamedSharding`` per trained param, from the logical-axis rules.
      frozen_shardings: the same for a LoRA model's frozen base (``None`` for full fine-tuning).
      state_shardings: a sharding per :class:`train.step.TrainState` leaf (optimizer state derived from params).
      abstract_state: ``ShapeDtypeStruct``s of the state carrying those shardings (restore and AOT target).
      batch_sharding: how every batch array is laid out (rows over ``data`` × ``fsdp``).
      step: the jitted ``(state, batch) -> (state, metrics)``, state donated.
      rows_per_device: rows each data-parallel device holds per micro-batch.
    """

    config: TrainConfig
    mesh: Mesh
    optimizer: optax.GradientTransformation
    apply_fn: step_lib.ModelApply
    params_shardings: Any
    frozen_shardings: Any
    state_shardings: step_lib.TrainState
    abstract_state: step_lib.TrainState
    batch_sharding: NamedSharding
    step: Callable[[step_lib.TrainState, Mapping[str, jax.Array]], tuple[step_lib.TrainState, dict[str, jax.Array]]]
    rows_per_device: int

    def merge(self, params: Any, frozen: Any = None) -> Any:
        """The NNX model with ``params`` (and a LoRA model's ``frozen`` base) in place (generation, export)."""
        return self.apply_fn.merge(params, frozen)

    def init_state(self, params: Any, frozen: Any = None) -> step_lib.TrainState:
        """The step-0 state built on the mesh: ``params`` (and a LoRA model's ``frozen`` base) placed by their
        shardings, the optimizer state created in place (never whole on one device)."""
        c = self.config
        state, _ = step_lib.create_train_state(
            params,
            self.optimizer,
            mesh=self.mesh,
            params_shardings=self.params_shardings,
            seed=c.seed,
            l2sp=c.l2sp_weight > 0,
            frozen=frozen,
            frozen_shardings=self.frozen_shardings,
        )
        return state

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as sharded ``ShapeDtypeStruct``s (for lowering without data)."""
        shape = (self.config.data.batch_size, self.config.data.seq_len)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=self.batch_sharding)
            for k in step_lib.BATCH_KEYS
        }

    def place_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch → global device arrays; each process contributes only the rows its devices hold."""
        return place_batch(host_batch, self.batch_sharding)

    def lower(self) -> jax.stages.Lowered:
        """The step lowered for abstract state and batch (``.compile()`` it for memory and cost analysis)."""
        return self.step.lower(self.abstract_state, self.abstract_batch())


def place_batch(host_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A host batch → global device arrays laid out by ``sharding`` (multi-process: the local rows only)."""
    host_batch = step_lib.host_batch_arrays(host_batch)
    shape = host_batch["tokens"].shape
    rows = data_lib.local_rows(sharding, shape)
    return {k: jax.make_array_from_process_local_data(sharding, v[rows], v.shape) for k, v in host_batch.items()}


def build_program(
    cfg: TrainConfig,
    model: Any,
    *,
    devices: Sequence[Any] | None = None,
    unroll_loss: bool = False,
) -> tuple[TrainProgram, Any, Any]:
    """Builds the train program of ``cfg`` for ``model``.

    Args:
      cfg: the run's config (mesh, batch, optimizer, seed, L2-SP).
      model: an NNX ``models.CausalLM``, concrete or abstract (:func:`abstract_model`), with its LoRA adapters if
        it has any (:func:`load_model` adds them).
      devices: the devices of the mesh (default: all of them; a TPU topology's for AOT compiles).
      unroll_loss: unroll the loss's loop over chunks (same values): only for counting FLOPs (``train.compile``).

    Returns:
      ``(program, params, frozen)``: the trained params as split from ``model`` (every weight, or a LoRA model's
      adapters) and a LoRA model's frozen base (``None`` otherwise); arrays, or ``ShapeDtypeStruct``s for an
      abstract model; ready for :meth:`TrainProgram.init_state`.

    Raises:
      ConfigError, ShardingError: a mesh, batch, rule or optimizer setting that cannot work.
    """
    mesh = preflight(cfg, devices)
    rules = mesh_lib.parse_rules(cfg.mesh.rules)
    optimizer = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
    apply_fn, params, frozen = step_lib.split_model(model, unroll_loss=unroll_loss)
    logical = models.logical_axes(model)
    params_shardings = mesh_lib.param_shardings(params, logical, mesh, rules)
    frozen_shardings = None if frozen is None else mesh_lib.param_shardings(frozen, logical, mesh, rules)
    init = functools.partial(step_lib.init_train_state, tx=optimizer, seed=cfg.seed, l2sp=cfg.l2sp_weight > 0)
    abstract = jax.eval_shape(lambda p, f: init(p, frozen=f), params, frozen)
    state_shardings = step_lib.train_state_shardings(abstract, params_shardings, mesh, frozen_shardings)
    step = step_lib.make_train_step(
        apply_fn,
        optimizer,
        grad_accum=cfg.data.grad_accum,
        l2sp_weight=cfg.l2sp_weight,
        mesh=mesh,
        state_shardings=state_shardings,
    )
    program = TrainProgram(
        config=cfg,
        mesh=mesh,
        optimizer=optimizer,
        apply_fn=apply_fn,
        params_shardings=params_shardings,
        frozen_shardings=frozen_shardings,
        state_shardings=state_shardings,
        abstract_state=step_lib.abstract_like(state_shardings, abstract),
        batch_sharding=mesh_lib.batch_sharding(mesh),
        step=step,
        rows_per_device=check_batch(cfg, mesh),
    )
    return program, params, frozen
