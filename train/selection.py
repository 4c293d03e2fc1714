"""Which checkpoint a run keeps, and when it stops: the early-stopping front of the forgetting lab, per run.

At every evaluation (``data.validation_every``) a run records the validation loss and, with ``data.retain_files``,
the retain KL (:mod:`train.retain`). ``output.select`` picks the checkpoint the run exports as ``hf/``:

* ``last``: the final step (the default).
* ``best_validation``: the lowest validation loss.
* ``least_forgetting``: among the evaluated checkpoints whose validation loss is within ``output.select_tolerance``
  (relative) of the best, the one with the smallest retain KL. The lab's E1 found that a constant learning rate
  stopped at such a checkpoint forgot less than FINCH at the same task loss (docs/results.md); this makes that
  checkpoint the run's answer.

Only checkpoints still eligible are protected from ``checkpoint.keep`` rotation (:meth:`Selection.protected`): the best
validation loss only ever falls, so a checkpoint that drops out of the tolerance band never returns to it.

:class:`EarlyStop` ends a run (exit 0, with the reason) when the validation loss has not improved for
``guard.patience`` evaluations, or when the retain KL exceeds ``guard.max_retain_kl``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from train.config import ConfigError, TrainConfig

__all__ = ["RULES", "EarlyStop", "Evaluation", "Selection", "check_settings"]

RULES = ("last", "best_validation", "least_forgetting")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluated checkpoint: its step, validation loss and (with a retain set) retain KL and loss."""

    step: int
    val_loss: float
    retain_kl: float | None = None
    retain_loss: float | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def check_settings(cfg: TrainConfig) -> None:
    """Refuses a selection or early stop the run cannot carry out, before anything loads."""
    out, guard, data = cfg.output, cfg.guard, cfg.data
    if out.select not in RULES:
        raise ConfigError(f"output.select must be one of {', '.join(RULES)}, got {out.select!r}")
    if not (out.select_tolerance >= 0 and math.isfinite(out.select_tolerance)):
        raise ConfigError(f"output.select_tolerance must be a finite number >= 0, got {out.select_tolerance}")
    if guard.patience < 0 or not (guard.max_retain_kl >= 0 and math.isfinite(guard.max_retain_kl)):
        raise ConfigError("guard.patience and guard.max_retain_kl must be >= 0 (0: off)")
    needs_validation = out.select != "last" or guard.patience > 0
    if needs_validation and not data.validation_files:
        raise ConfigError(
            f"output.select={out.select} / guard.patience={guard.patience} read the validation loss: set "
            "data.validation_files (and data.validation_every for evaluations during the run)"
        )
    if (out.select == "least_forgetting" or guard.max_retain_kl > 0) and not data.retain_files:
        raise ConfigError(
            "output.select=least_forgetting and guard.max_retain_kl read the retain KL: set data.retain_files "
            "(text the model should not forget; `finch-train prepare retain` writes the lab's built-in one)"
        )
    if out.select != "last" and not cfg.checkpoint.enabled:
        raise ConfigError(f"output.select={out.select} exports a saved checkpoint: checkpoint.enabled must be true")


class Selection:
    """The checkpoint ``rule`` picks among the evaluations seen so far (step 0, the base model, never counts)."""

    def __init__(self, rule: str, tolerance: float, evaluations: Sequence[Evaluation] = ()):
        self.rule, self.tolerance = rule, tolerance
        self.evaluations: list[Evaluation] = [e for e in evaluations if e.step > 0]

    def add(self, evaluation: Evaluation) -> None:
        if evaluation.step > 0:
            self.evaluations.append(evaluation)

    def _eligible(self) -> list[Evaluation]:
        if not self.evaluations:
            return []
        best = min(e.val_loss for e in self.evaluations)
        band = best + self.tolerance * abs(best)
        return [e for e in self.evaluations if e.val_loss <= band]

    @property
    def selected(self) -> Evaluation | None:
        """The chosen evaluation (``None`` for ``last`` or before any evaluation); the earliest on ties."""
        if self.rule == "last" or not self.evaluations:
            return None
        if self.rule == "best_validation":
            return min(self.evaluations, key=lambda e: (e.val_loss, e.step))
        eligible = [e for e in self._eligible() if e.retain_kl is not None]
        return min(eligible, key=lambda e: (e.retain_kl, e.step)) if eligible else None

    def protected(self) -> set[int]:
        """Steps that may still be selected: kept out of checkpoint rotation."""
        if self.rule == "best_validation":
            selected = self.selected
            return set() if selected is None else {selected.step}
        if self.rule == "least_forgetting":
            return {e.step for e in self._eligible()}
        return set()


class EarlyStop:
    """``check(evaluations)`` -> the reason to stop now, or ``None``."""

    def __init__(self, patience: int, max_retain_kl: float):
        self.patience, self.max_retain_kl = patience, max_retain_kl

    def check(self, evaluations: Sequence[Evaluation]) -> str | None:
        if not evaluations:
            return None
        last = evaluations[-1]
        if self.max_retain_kl > 0 and last.retain_kl is not None and last.retain_kl > self.max_retain_kl:
            return (
                f"the retain KL {last.retain_kl:.4g} at step {last.step} exceeds guard.max_retain_kl="
                f"{self.max_retain_kl:g} (the forgetting budget)"
            )
        if self.patience > 0 and len(evaluations) > self.patience:
            best_before = min(e.val_loss for e in evaluations[: -self.patience])
            if all(e.val_loss >= best_before for e in evaluations[-self.patience :]):
                return (
                    f"the validation loss has not improved on {best_before:.4g} for {self.patience} evaluations "
                    f"(guard.patience), at step {last.step}"
                )
        return None
