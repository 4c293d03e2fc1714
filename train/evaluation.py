"""What a run measures at each evaluation, and what follows from it: the validation loss, the retain KL and loss
(:mod:`train.retain`), a few greedy generations, the checkpoint selection and the early stop (:mod:`train.selection`).

``finetune`` calls a :class:`RunEvaluation` before training (step 0, the base), every ``data.validation_every``
steps and at the end; everything it measures goes to the metrics (``metrics.jsonl``, TensorBoard, W&B), the
progress line and, at the end, ``selection.png`` (validation loss against retain KL per evaluated checkpoint: the
lab's front plot for one run).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import program as program_lib
from train import storage
from train.config import TrainConfig
from train.metrics_log import MetricsLogger
from train.retain import RetainEvaluator
from train.selection import EarlyStop, Evaluation, Selection
from train.validation import Validator

__all__ = [
    "RunEvaluation",
    "builtin_retain_path",
    "generation_prompts",
    "plot_selection",
    "retain_paths",
    "subsample",
]


def builtin_retain_path() -> str:
    """The built-in retain text (held-out Austen and Brown, a JSONL of texts), written by ``finch-train prepare
    retain`` into the data cache (``$FINCH_DATA_DIR`` or ``./data_cache``)."""
    return os.path.join(os.environ.get("FINCH_DATA_DIR") or "data_cache", "retain", "retain.jsonl")


def retain_paths(files: Sequence[str]) -> list[str]:
    """``data.retain_files`` with ``builtin`` resolved to the prepared built-in retain text."""
    paths = []
    for name in files:
        if name != "builtin":
            paths.append(name)
            continue
        path = builtin_retain_path()
        if not os.path.isfile(path):
            raise data_lib.DataError(
                f"data.retain_files=[builtin] reads {path}, which does not exist yet: run `finch-train prepare "
                "retain` (it fetches Austen and the Brown corpus, about 10 MB, once)"
            )
        paths.append(path)
    return paths


def subsample(split: data_lib.DataSplit, rows: int) -> data_lib.DataSplit:
    """``split`` with at most ``rows`` of its packed rows, evenly spaced over it (0: all): the retain KL's cost per
    evaluation stays fixed however much retain text there is."""
    n = len(split.rows)
    if rows <= 0 or n <= rows:
        return split
    index = np.unique(np.linspace(0, n - 1, rows).round().astype(np.int64))
    return dataclasses.replace(split, rows=dataclasses.replace(split.rows, **split.rows.take(index)))


def generation_prompts(tokenizer: Any, cfg: TrainConfig, count: int) -> list[str]:
    """Up to ``count`` prompts from the validation files: a chat up to its first reply (rendered for the reply),
    a prompt/completion row's prompt, or the first words of a text."""
    if count <= 0 or not cfg.data.validation_files:
        return []
    prompts = []
    template = None
    for doc in data_lib.read_documents([storage.local_copy(f) for f in cfg.data.validation_files]):
        if doc.messages:
            first_reply = next((i for i, m in enumerate(doc.messages) if m.get("role") == "assistant"), None)
            if first_reply is None:
                continue
            template = template or data_lib.chat_template_for(tokenizer, cfg.data)
            prompts.append(template.render(list(doc.messages[:first_reply]), add_generation_prompt=True))
        elif doc.prompt:
            prompts.append(doc.prompt)
        else:
            prompts.append(" ".join(doc.text.split()[:12]))
        if len(prompts) == count:
            break
    return prompts


class RunEvaluation:
    """Measures a run's state at an evaluation step; keeps the history, the selection and the early stop.

    Args:
      cfg: the run's config.
      program: its :class:`train.program.TrainProgram`.
      validation, retain: the packed validation and retain splits (either may be ``None``).
      tokenizer: for the generations.
      initial: the step-0 state (the base model's weights: the retain KL's reference is taken from it here).
      logger: where the measurements go (set it later, once the run folder exists).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        program: program_lib.TrainProgram,
        *,
        validation: data_lib.DataSplit | None,
        retain: data_lib.DataSplit | None,
        tokenizer: Any,
        initial: Any,
        logger: MetricsLogger | None = None,
    ):
        self.cfg, self.program, self.tokenizer, self.logger = cfg, program, tokenizer, logger
        micro = cfg.data.batch_size // cfg.data.grad_accum
        self.validator = None
        if validation is not None:
            self.validator = Validator(
                program.apply_fn,
                validation.rows,
                micro,
                program.place_batch,
                program.params_shardings,
                program.batch_sharding,
                program.frozen_shardings,
            )
        self.retain = None
        if retain is not None:
            lora = initial.frozen is not None
            # A LoRA model with its adapters switched off (B = 0) is the base: exact, and no copy of the base kept.
            base_params = jax.tree.map(jnp.zeros_like, initial.params) if lora else initial.params
            self.retain = RetainEvaluator(
                program.apply_fn,
                retain.rows,
                micro,
                program.place_batch,
                base_params=base_params,
                frozen=initial.frozen,
                top_k=cfg.data.retain_top_k,
                exact_base=lora,
            )
        # Generations decode on one host; a multi-process run, whose params span hosts, skips them.
        count = cfg.output.generations if jax.process_count() == 1 else 0
        self.prompts = generation_prompts(tokenizer, cfg, count)
        self.history: list[Evaluation] = []
        self.seconds = {"validation": 0.0, "retain": 0.0, "generations": 0.0}  # what the evaluations cost
        self.selection = Selection(cfg.output.select, cfg.output.select_tolerance)
        self.early_stop = EarlyStop(cfg.guard.patience, cfg.guard.max_retain_kl)

    def resume(self, history: Sequence[Evaluation]) -> None:
        """Takes over the evaluations of an earlier session of the same run (from its checkpoint)."""
        self.history = list(history)
        self.selection = Selection(self.cfg.output.select, self.cfg.output.select_tolerance, self.history)

    @property
    def active(self) -> bool:
        return self.validator is not None or self.retain is not None

    def __call__(self, step: int, state: Any) -> Evaluation:
        """Measures ``state`` (waits for its step to finish first), logs it and updates the selection."""
        jax.block_until_ready(state)  # as for saves: never interleave two programs' collectives
        values: dict[str, float] = {}
        clock = time.perf_counter()
        if self.validator is not None:
            values["val_loss"], values["val_tokens"] = self.validator(state.params, state.frozen)
            clock = self._spent("validation", clock)
        if self.retain is not None:
            values.update(self.retain(state.params, state.frozen))
            clock = self._spent("retain", clock)
        evaluation = Evaluation(step, values.get("val_loss", float("nan")), values.get("retain_kl"))
        evaluation = dataclasses.replace(evaluation, retain_loss=values.get("retain_loss"))
        self.logger.log_eval(step, values)
        if self.prompts:
            self.logger.log_text(step, "generations", self._generations(state))
            self._spent("generations", clock)
        self.history.append(evaluation)
        self.selection.add(evaluation)
        return evaluation

    def _spent(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[part] += now - since
        return now

    def stop_reason(self) -> str | None:
        """Why the run should stop now (early stopping, the forgetting budget), or ``None``."""
        return self.early_stop.check([e for e in self.history if e.step > 0])

    def _generations(self, state: Any) -> str:
        from train.generate import complete  # generation is only needed here

        model = self.program.merge(jax.device_get(state.params), jax.device_get(state.frozen))
        replies = complete(model, self.tokenizer, self.prompts, self.cfg.output.generation_tokens)
        return "\n\n".join(f"{prompt!r} -> {reply!r}" for prompt, reply in zip(self.prompts, replies))


def plot_selection(evaluations: Sequence[Evaluation], selected: Evaluation | None, path: str, title: str) -> bool:
    """Validation loss against retain KL per evaluated checkpoint (the selected one circled); ``False`` when there
    is nothing to plot (no retain KL measured)."""
    points = [e for e in evaluations if e.retain_kl is not None and e.val_loss == e.val_loss]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([e.val_loss for e in points], [e.retain_kl for e in points], "-o", color="tab:blue", ms=4)
    for e in points:
        ax.annotate(str(e.step), (e.val_loss, e.retain_kl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if selected is not None and selected.retain_kl is not None:
        ax.plot([selected.val_loss], [selected.retain_kl], "o", ms=13, mfc="none", mec="tab:red", label="selected")
        ax.legend()
    ax.set_xlabel("validation loss (lower is better)")
    ax.set_ylabel("KL(base ‖ current) per retain token")
    ax.invert_xaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
