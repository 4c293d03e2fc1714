"""The method grammar of ``compare`` (``--method KIND[:key=value,...]``) and its expansion into concrete runs.

Each kind becomes one AdamW or ``finch_adamw`` run per seed (``sweep`` one per lr); ``docs/lab.md`` describes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from train.lab.config import CompareConfig

__all__ = ["METHODS", "MethodSpec", "RunSpec", "expand_runs", "parse_method"]


@dataclasses.dataclass(frozen=True)
class _MethodKind:
    help: str
    options: dict[str, type]


# A small table of data: the method kinds and the options each accepts (anything else is an error).
METHODS: dict[str, _MethodKind] = {
    "sft": _MethodKind("AdamW at constant lr_max", {}),
    "sft_cosine": _MethodKind("AdamW warmup+cosine, peak lr_max", {"warmup": int}),
    "finch": _MethodKind("finch_adamw, cap lr_max", {"base": float, "ema": float}),
    "sweep": _MethodKind("AdamW at each constant lr of lrs", {"lrs": list}),
    "warmup_matched": _MethodKind("AdamW replaying FINCH's lr trace", {"source": str, "replay": str}),
    "l2sp": _MethodKind("AdamW at lr_max + L2-SP", {"weight": float}),
    "stm": _MethodKind("AdamW at lr_max, high-loss tokens dropped", {"threshold": float}),
}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method kind and its options, e.g. ``MethodSpec("stm", {"threshold": 5.0})``."""

    kind: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_method(spec: str | Mapping[str, Any]) -> MethodSpec:
    """``"kind:key=value,key=value"`` (lists as ``a/b/c``) or a mapping ``{kind: ..., key: value}`` -> MethodSpec.

    Examples:
      >>> parse_method("sweep:lrs=1e-5/3e-5")
      MethodSpec(kind='sweep', options={'lrs': [1e-05, 3e-05]})
      >>> parse_method("l2sp:threshold=3")
      Traceback (most recent call last):
      ...
      ValueError: method 'l2sp' has no option 'threshold' (valid: weight); threshold is an option of stm
    """
    if isinstance(spec, Mapping):
        values = dict(spec)
        kind = values.pop("kind", None)
        raw = {k: v for k, v in values.items()}
    else:
        kind, _, rest = str(spec).partition(":")
        raw = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method {spec!r}: option {item!r} is not key=value")
            raw[key.strip()] = value.strip()
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}; valid: {', '.join(METHODS)}")
    allowed = METHODS[kind].options
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            owners = [k for k, m in METHODS.items() if key in m.options]
            hint = f"; {key} is an option of {', '.join(owners)}" if owners else ""
            raise ValueError(f"method {kind!r} has no option {key!r} (valid: {', '.join(allowed) or 'none'}){hint}")
        typ = allowed[key]
        try:
            if typ is list:
                items = value if isinstance(value, (list, tuple)) else str(value).split("/")
                options[key] = [float(v) for v in items]
                if not options[key] or any(not v > 0 for v in options[key]):
                    raise ValueError
            else:
                options[key] = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"method {kind!r}: option {key}={value!r} is not a valid {typ.__name__}") from None
    return MethodSpec(kind, options)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the comparison."""

    label: str
    kind: str
    seed: int
    optimizer: Mapping[str, Any]
    l2sp_weight: float = 0.0
    stm_threshold: float | None = None
    trace_source: str | None = None  # label of the run whose lr trace this one replays
    trace_seed: int | None = None  # ... recorded with this seed
    on_front: bool = False  # a constant-lr AdamW run: part of the lr front

    @property
    def run_id(self) -> str:
        return f"{self.label}__seed{self.seed}"


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def expand_runs(cfg: CompareConfig) -> list[RunSpec]:
    """The runs of ``cfg`` in execution order; errors (duplicate labels, a missing trace source) before any run."""
    specs = [parse_method(m) for m in cfg.methods]
    adamw = {"name": "adamw", "schedule": "constant", "learning_rate": cfg.lr_max, "weight_decay": cfg.weight_decay}
    per_seed: list[tuple[str, str, dict, dict]] = []  # (label, kind, optimizer, extras)
    for spec in specs:
        o = spec.options
        if spec.kind == "sft":
            per_seed.append((f"sft@{_lr_label(cfg.lr_max)}", "sft", adamw, {"on_front": True}))
        elif spec.kind == "sft_cosine":
            warmup = int(o.get("warmup", max(cfg.steps // 10, 1)))
            if not 0 <= warmup < cfg.steps:
                raise ValueError(f"method sft_cosine: warmup={warmup} must be in [0, steps={cfg.steps})")
            per_seed.append(
                (
                    "sft_cosine",
                    "sft_cosine",
                    dict(adamw, schedule="warmup_cosine", warmup_steps=warmup, decay_steps=cfg.steps),
                    {},
                )
            )
        elif spec.kind == "finch":
            base = float(o.get("base", cfg.lr_max))
            per_seed.append(
                (
                    "finch",
                    "finch",
                    {
                        "name": "finch_adamw",
                        "learning_rate": cfg.lr_max,
                        "base_learning_rate": base,
                        "ema_decay": float(o.get("ema", 0.9)),
                        "weight_decay": cfg.weight_decay,
                        "schedule": "constant",
                    },
                    {},
                )
            )
        elif spec.kind == "sweep":
            for lr in o.get("lrs", [cfg.lr_max / 10, cfg.lr_max / 3]):
                per_seed.append((f"const@{_lr_label(lr)}", "sweep", dict(adamw, learning_rate=lr), {"on_front": True}))
        elif spec.kind == "warmup_matched":
            source = o.get("source", "finch")
            replay = o.get("replay", "other")
            if replay not in ("other", "same"):
                raise ValueError(f"method warmup_matched: replay={replay!r} must be 'other' or 'same'")
            per_seed.append(
                (
                    "warmup_matched",
                    "warmup_matched",
                    dict(adamw, schedule="trace"),
                    {"trace_source": source, "replay": replay},
                )
            )
        elif spec.kind == "l2sp":
            weight = float(o.get("weight", 1.0))
            per_seed.append((f"l2sp(w={weight:g})", "l2sp", adamw, {"l2sp_weight": weight}))
        elif spec.kind == "stm":
            threshold = float(o.get("threshold", 6.0))
            per_seed.append((f"stm(t={threshold:g})", "stm", adamw, {"stm_threshold": threshold}))
    labels = [p[0] for p in per_seed]
    seen: dict[str, str] = {}
    for label, _, optimizer, extras in per_seed:
        # Same label, or the same training under another name (sft at lr_max == a sweep point at lr_max).
        for key in (
            label,
            json.dumps([optimizer, {k: v for k, v in extras.items() if k != "on_front"}], sort_keys=True),
        ):
            if key in seen:
                raise ValueError(
                    f"compare: methods give duplicate runs {seen[key]!r} and {label!r}; list each method/lr once"
                )
            seen[key] = label
    for label, _kind, _, extras in per_seed:
        source = extras.get("trace_source")
        if source is not None and source not in [lab for lab, *_ in per_seed if lab != label]:
            raise ValueError(
                f"method warmup_matched replays the lr trace of {source!r}, which is not among the "
                f"methods (have {labels}); add `finch` (or set source=<label>)"
            )
    # Runs that replay another run's lr trace go last, so every seed's source run has finished before them.
    runs, replays = [], []
    for i, seed in enumerate(cfg.seeds):
        for label, kind, optimizer, extras in per_seed:
            if "trace_source" in extras:
                replay = dict(extras)
                mode = replay.pop("replay")
                # "other": the trace of the next seed in the list (cyclic): a fixed schedule that did not see this
                # run's own losses. With one seed there is no other; the replay is then the same-seed trace, which
                # reproduces the source run exactly (a check that FINCH acts only through its lr).
                replay["trace_seed"] = cfg.seeds[(i + 1) % len(cfg.seeds)] if mode == "other" else seed
                replays.append(RunSpec(label=label, kind=kind, seed=seed, optimizer=optimizer, **replay))
            else:
                runs.append(RunSpec(label=label, kind=kind, seed=seed, optimizer=optimizer, **extras))
    return runs + replays
