"""What a fine-tuning run says about itself: the start summary, the random-init warning and the final summary.

Each is built from what the run already holds (config, params and their shardings, the data splits, the resume
step) and returned as text, so ``finetune`` decides where it goes (stdout of process 0) and tests read it as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from train import data as data_lib
from train import storage
from train.config import TrainConfig

__all__ = ["RunEnd", "count_parameters", "random_init_warning", "start_summary"]


def count_parameters(params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def count_weights(frozen: Any) -> int:
    """The weights a LoRA model's frozen base stands for: plain ones, and quantized kernels' codes (two per byte
    for nf4), not their scales."""
    if frozen is None:
        return 0
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("_scales"):
            continue
        total += math.prod(x.shape) * (2 if name.endswith("_codes") and x.dtype == jnp.uint8 else 1)
    return total


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _amount(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"


def _mesh_line(cfg: TrainConfig, mesh: jax.sharding.Mesh, params: Any, shardings: Any) -> str:
    sizes = " ".join(f"{axis}={mesh.shape[axis]}" for axis in mesh.axis_names)
    devices = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    leaves, specs = jax.tree.leaves(params), jax.tree.leaves(shardings)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, specs))
    axes = sorted({a for s in specs for part in s.spec if part for a in ((part,) if isinstance(part, str) else part)})
    where = (
        "replicated on every device"
        if per_device == total
        else f"sharded over {'+'.join(axes)}: {_bytes(per_device)} of {_bytes(total)} per device"
    )
    return (
        f"mesh       {sizes} on {devices} {platform} device{'s' * (devices > 1)}: batch rows split over {dp} "
        f"data-parallel device{'s' * (dp > 1)}; "
        f"params and optimizer state {where}"
    )


def _optimizer_line(cfg: TrainConfig) -> str:
    o = cfg.optimizer
    if o.name.startswith("finch_"):
        rates = (
            f"max_learning_rate {o.max_learning_rate:g}, base_learning_rate {o.base_learning_rate:g}, "
            f"loss EMA decay {o.ema_decay:g}"
        )
    else:
        rates = f"lr {o.learning_rate:g}"
    schedule = o.schedule
    if schedule == "warmup_cosine":
        schedule += f" (warmup {o.warmup_steps} steps)"
    extra = f", clip {o.clip_norm:g}" if o.clip_norm else ""
    return f"optimizer  {o.name}: {rates}, {schedule}, weight decay {o.weight_decay:g}{extra}"


def _split_lines(title: str, split: data_lib.DataSplit, seq_len: int) -> list[str]:
    lines = []
    for s in split.sources:
        extra = f", {s.skipped} rows skipped" if s.skipped else ""
        if s.untrained_replies:
            extra += f", {s.untrained_replies} assistant replies kept as context only"
        lines.append(
            f"{title:<10} {s.name}: {s.documents:,} documents, {s.tokens:,} tokens ({s.trained_tokens:,} trained){extra}"
        )
        title = ""
    rows = split.rows
    lines.append(f"{'':<10} -> {len(rows):,} rows of {seq_len} tokens ({rows.fill:.0%} filled)")
    if split.cache is not None:
        lines.append(f"{'':<10} {_cache_line(split.cache)}")
    if split.issues.skipped:
        lines.append(f"{'':<10} {split.issues.describe()}")
    return lines


def _cache_line(entry: Any) -> str:
    meta, size = entry.meta, entry.disk_bytes
    tokens = sum(s["tokens"] for s in meta["sources"])
    if entry.hit:
        how = f"found, built {meta['built_at']}"
    else:
        rate = tokens / max(meta["build_seconds"], 1e-9)
        how = f"built in {meta['build_seconds']:.1f} s, {rate / 1e6:.2f}M tokens/s"
    where = entry.path if entry.remote is None else f"{entry.remote} (mapped from {entry.path})"
    return f"token cache {where} ({how}; {size / 2**20:,.1f} MiB, {size / max(tokens, 1):.2f} bytes/token)"


def random_init_warning(source: str) -> str:
    return (
        f"WARNING: model.source={source} is a randomly initialised model, not a pretrained one: fine-tuning it "
        "teaches it nothing useful. Set model.source=gguf:smollm2, hf:DIR, hub:REPO_ID or gguf:PATH."
    )


def start_summary(
    cfg: TrainConfig,
    *,
    model_name: str,
    params: Any,
    params_shardings: Any,
    frozen: Any = None,
    mesh: jax.sharding.Mesh,
    train: data_lib.DataSplit,
    validation: data_lib.DataSplit | None,
    start_step: int,
    chat_template: str | None,
) -> str:
    """The lines a run prints before its first step."""
    m, d = cfg.model, cfg.data
    trained = count_parameters(params)
    n = trained + count_weights(frozen)
    lines = [
        f"model      {model_name}: {_amount(n)} parameters ({n:,}), stored {m.param_dtype}, computed in {m.dtype}",
        _mesh_line(cfg, mesh, params, params_shardings),
    ]
    if frozen is not None:
        lora, base = m.lora, "quantized " + m.lora.quantize if m.lora.quantize != "none" else f"in {m.param_dtype}"
        lines.append(
            f"lora       rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}: {_amount(trained)} "
            f"trained parameters ({100 * trained / n:.2f}%); the base is frozen, {base}, "
            f"{_bytes(_nbytes(frozen))}; checkpoints hold the adapters only"
        )
    lines += _split_lines("data", train, d.seq_len)
    if validation is not None:
        every = f"every {d.validation_every} steps" if d.validation_every else "before and after training"
        lines += _split_lines("validation", validation, d.seq_len)
        lines[-1] += f"; loss measured {every}"
    if chat_template:
        lines.append(f"{'':<10} chats rendered with {chat_template}; loss on assistant replies only")
    per_step = d.batch_size * d.seq_len
    epochs = cfg.steps * d.batch_size / len(train.rows)
    lines.append(
        f"steps      {cfg.steps} x {d.batch_size} rows x {d.seq_len} tokens = {per_step:,} tokens per step "
        f"({epochs:.1f} epochs of the training rows{f', from data.epochs={d.epochs:g}' if d.epochs else ''})"
        + (f", {d.grad_accum} micro-batches" if d.grad_accum > 1 else "")
    )
    lines.append(_optimizer_line(cfg))
    out = cfg.output
    lines.append(f"output     {out.dir}/")
    if cfg.checkpoint.enabled and cfg.checkpoint.directory:
        every = f"every {cfg.checkpoint.every} steps and " if cfg.checkpoint.every else ""
        every += "at every evaluation and " if cfg.output.select != "last" else ""
        minutes = cfg.checkpoint.every_minutes
        every += f"every {minutes:g} min of training and " if minutes > 0 else ""
        if minutes > 0:
            lost = f"a crash loses at most ~{minutes:g} min of training"
        elif cfg.checkpoint.every:
            lost = f"a crash loses at most {cfg.checkpoint.every} steps"
        else:
            lost = "a crash loses the whole run"
        lines.append(
            f"{'':<10} checkpoints {cfg.checkpoint.directory} ({every}at the end, keep {cfg.checkpoint.keep}; {lost})"
        )
    if out.hf_export:
        every = f", and hf-step-N every {out.hf_every} steps" if out.hf_every else ""
        adapter = ", and the PEFT adapter in hf-adapter/" if cfg.model.lora.enabled else ""
        picked = f"of the checkpoint output.select={out.select} picks" if out.select != "last" else "at the end"
        lines.append(
            f"{'':<10} Hugging Face model {storage.join(out.dir, 'hf')} {picked}{every} ({out.hf_dtype}){adapter}"
        )
    lines.append(
        f"resume     from step {start_step} of {cfg.steps}" if start_step else "resume     none: starting at step 0"
    )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RunEnd:
    """How a run ended: printed by :meth:`text` after its last step, written by :meth:`write` as ``summary.json``.

    ``interrupted`` is the error that ended a run before its last step (divergence, SIGTERM, a failed save), ``None``
    when it finished; ``stopped`` is why a run that finished did so before ``steps`` (early stopping, the forgetting
    budget: it exported and exited 0).
    """

    cfg: TrainConfig
    start_step: int
    records: Sequence[dict[str, float]]
    validation: Sequence[tuple[int, float]]
    seconds: float
    checkpoint_steps: Sequence[int]
    hf_dir: str | None
    interrupted: str | None = None  # the error that ended the run before its last step (nothing exported)
    selected: dict[str, Any] | None = None  # the evaluation output.select chose (its step is exported as hf/)
    stopped: str | None = None  # why the run ended before its steps (early stopping, the forgetting budget)
    evaluation_seconds: dict[str, float] | None = None  # time spent on validation, retain KL and generations

    @property
    def skipped_steps(self) -> int:
        """Steps of this session whose NaN/inf loss or gradient made them change nothing (``consecutive_skips`` > 0
        on exactly those)."""
        return sum(1 for r in self.records if r.get("consecutive_skips", 0) > 0)

    def text(self) -> str:
        """The lines a run prints after its last step (or when there was nothing to train)."""
        cfg, records, validation = self.cfg, self.records, self.validation
        if not records:
            lines = [f"nothing to train: the checkpoint is already at step {self.start_step} >= steps={cfg.steps}"]
        else:
            per_step = self.seconds / len(records)
            first = "stopped   " if self.interrupted else "done      "
            lines = [
                f"{first} steps {self.start_step} -> {records[-1]['step']} in {self.seconds:.1f}s "
                f"({per_step:.2f}s/step); loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}"
            ]
        if validation:
            lines[-1] += f"; validation loss {validation[0][1]:.4f} (step {validation[0][0]})"
            if len(validation) > 1:
                lines[-1] += f" -> {validation[-1][1]:.4f} (step {validation[-1][0]})"
        if self.interrupted:
            lines.append(f"stopped    before step {cfg.steps}: {self.interrupted}")
        if self.skipped_steps:
            lines.append(
                f"skipped    {self.skipped_steps} of {len(records)} steps had a NaN/inf loss or gradient and changed "
                "nothing (see `skipped` in metrics.jsonl); lower the learning rate or check the data if that is many"
            )
        spent = {k: v for k, v in (self.evaluation_seconds or {}).items() if v > 0}
        if spent and self.seconds > 0:
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in spent.items())
            lines.append(f"evaluated  {parts}: {100 * sum(spent.values()) / self.seconds:.1f}% of the training time")
        if self.stopped:
            lines.append(f"stopped    early: {self.stopped}")
        if self.selected is not None and not self.interrupted:
            kl = f", retain KL {self.selected['retain_kl']:.4g}" if "retain_kl" in self.selected else ""
            lines.append(
                f"selected   step {self.selected['step']} (output.select={cfg.output.select}: validation loss "
                f"{self.selected['val_loss']:.4f}{kl}); exported as hf/"
            )
        lines.append(f"metrics    {self._metrics_path()}" + (" and tensorboard/" if cfg.tensorboard else ""))
        if self.checkpoint_steps:
            lines.append(f"checkpoint {cfg.checkpoint.directory} (steps {', '.join(map(str, self.checkpoint_steps))})")
        if self.hf_dir and not self.interrupted:
            lines.append(
                f"model      {self.hf_dir} (Hugging Face: transformers, vLLM and llama.cpp's converter load it)"
            )
            if cfg.model.lora.enabled:
                lines.append(f"{'':<10} its LoRA adapters (PEFT) in {self.hf_dir}-adapter")
            lines.append(f"next       finch-train chat {self.hf_dir}")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """The same facts for scripts (``summary.json``)."""
        records = self.records
        return {
            "model": self.cfg.model.source,
            "steps": [self.start_step, records[-1]["step"] if records else self.start_step],
            "complete": self.interrupted is None,
            "interrupted": self.interrupted,
            "skipped_steps": self.skipped_steps,
            "seconds": self.seconds,
            "loss": [records[0]["loss"], records[-1]["loss"]] if records else None,
            "validation": [{"step": s, "loss": v} for s, v in self.validation],
            "metrics": self._metrics_path(),
            "checkpoints": {"directory": self.cfg.checkpoint.directory, "steps": list(self.checkpoint_steps)}
            if self.checkpoint_steps
            else None,
            "hf": None if self.interrupted else self.hf_dir,
            "selected": None if self.interrupted else self.selected,
            "stopped_early": self.stopped,
            "evaluation_seconds": self.evaluation_seconds,
        }

    def write(self) -> None:
        """``<output.dir>/summary.json``."""
        storage.write_text(storage.join(self.cfg.output.dir, "summary.json"), json.dumps(self.record(), indent=2))

    def _metrics_path(self) -> str:
        return storage.join(self.cfg.output.dir, "metrics.jsonl")
