"""The method grammar of ``compare`` (``--method KIND[:key=value,...]``) and its expansion into concrete runs.

Each kind becomes one AdamW or ``finch_adamw`` run per seed (``sweep`` one per lr); ``docs/lab.md`` describes them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from typing import Any

from train.lab.config import CompareConfig

__all__ = ["METHODS", "MethodSpec", "RunSpec", "expand_runs", "parse_method"]


@dataclasses.dataclass(frozen=True)
class _MethodKind:
    help: str
    options: dict[str, type]


# A small table of data: the method kinds and the options each accepts (anything else is an error). Every kind also
# takes `seeds=N` (run on the first N seeds of the comparison only) and `probe=N` (record the per-step retain probe
# on the first N seeds).
METHODS: dict[str, _MethodKind] = {
    "sft": _MethodKind("AdamW at constant max_learning_rate", {}),
    "sft_cosine": _MethodKind("AdamW warmup+cosine, peak max_learning_rate", {"warmup": int}),
    "finch": _MethodKind(
        "FINCH, cap max_learning_rate, base_learning_rate = max_learning_rate*sqrt(lstar) or given",
        {
            "lstar": float,
            "base_learning_rate": float,
            "ema": float,
            "max_learning_rate": float,
            "direction": str,
            "lora": int,
            "base": float,  # 0.1 names of base_learning_rate and max_learning_rate
            "lr": float,
        },
    ),
    "lora": _MethodKind(
        "AdamW at constant lr (default max_learning_rate) on LoRA adapters of rank (alpha = 2 × rank)",
        {"rank": int, "lr": float},
    ),
    "sweep": _MethodKind("AdamW at each constant lr of lrs", {"lrs": list}),
    "warmup_const": _MethodKind(
        "AdamW, linear warmup over frac of the steps to max_learning_rate, then constant", {"frac": float}
    ),
    "warmup_matched": _MethodKind("AdamW replaying FINCH's lr trace", {"source": str, "replay": str}),
    "l2sp": _MethodKind("AdamW at max_learning_rate + L2-SP", {"weight": float}),
    "stm": _MethodKind("AdamW at max_learning_rate, high-loss tokens dropped", {"threshold": float}),
}
_COMMON_OPTIONS: dict[str, type] = {"seeds": int, "probe": int}
# FINCH directions (train.optimizers: finch_<direction>).
_FINCH_DIRECTIONS = ("adamw", "adam", "sgd", "momentum", "lion", "adafactor")


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
      ValueError: method 'l2sp' has no option 'threshold' (valid: weight, seeds, probe); threshold is an option of stm
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
    allowed = {**METHODS[kind].options, **_COMMON_OPTIONS}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            owners = [k for k, m in METHODS.items() if key in m.options]
            hint = f"; {key} is an option of {', '.join(owners)}" if owners else ""
            raise ValueError(f"method {kind!r} has no option {key!r} (valid: {', '.join(allowed)}){hint}")
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
    on_front: bool = False  # a constant-lr AdamW run: its checkpoints make up the lr front
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (alpha 2 × rank) on every projection
    probe: bool = False  # record the per-step retain probe (does not change training)

    @property
    def run_id(self) -> str:
        return f"{self.label}__seed{self.seed}"


def _lr_label(lr: float) -> str:
    """``1e-4``, ``2.5e-5``, ``1.4e-4``: short, and distinct for the rates a sweep uses."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


_FINCH_OPTIONS_0_1 = {"lr": "max_learning_rate", "base": "base_learning_rate"}


def _finch(cfg: CompareConfig, o: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    o = dict(o)
    for old, new in _FINCH_OPTIONS_0_1.items():
        if old in o:
            warnings.warn(f"method finch: option {old}= is now {new}= (until 0.3)", FutureWarning, stacklevel=2)
            o.setdefault(new, o.pop(old))
    direction = o.get("direction", "adamw")
    if direction not in _FINCH_DIRECTIONS:
        raise ValueError(f"method finch: direction={direction!r} must be one of {', '.join(_FINCH_DIRECTIONS)}")
    if "base_learning_rate" in o and "lstar" in o:
        raise ValueError(
            "method finch: give base_learning_rate or lstar, not both (base_learning_rate = max_learning_rate * "
            "sqrt(lstar))"
        )
    cap = float(o.get("max_learning_rate", cfg.max_learning_rate))
    lstar = float(o.get("lstar", 1.0))
    if not cap > 0 or not lstar > 0:
        raise ValueError(f"method finch: max_learning_rate and lstar must be > 0, got {cap} and {lstar}")
    # base = cap * sqrt(L*): the rate reaches its cap once the running loss is <= L*.
    base = float(o.get("base_learning_rate", cap * lstar**0.5))
    parts = [f"L*={lstar:g}"] if "lstar" in o else []
    parts += [f"base={base:g}"] if "base_learning_rate" in o else []
    parts += [f"ema={float(o['ema']):g}"] if "ema" in o else []
    parts += [f"max_lr={cap:g}"] if "max_learning_rate" in o else []
    parts += [f"lora={int(o['lora'])}"] if "lora" in o else []
    name = "finch" if direction == "adamw" else f"finch_{direction}"
    label = name + (f"({', '.join(parts)})" if parts else "")
    optimizer = {
        "name": f"finch_{direction}",
        "max_learning_rate": cap,
        "base_learning_rate": base,
        "ema_decay": float(o.get("ema", 0.9)),
        "weight_decay": cfg.weight_decay,
        "schedule": "constant",
    }
    return label, optimizer


def _per_seed_runs(cfg: CompareConfig, spec: MethodSpec) -> list[tuple[str, str, dict, dict]]:
    """``(label, kind, optimizer, extras)`` of each run one method makes per seed."""
    o = spec.options
    lr = cfg.max_learning_rate
    adamw = {"name": "adamw", "schedule": "constant", "learning_rate": lr, "weight_decay": cfg.weight_decay}
    if spec.kind == "sft":
        return [(f"sft@{_lr_label(lr)}", "sft", adamw, {"on_front": True})]
    if spec.kind == "sft_cosine":
        warmup = int(o.get("warmup", max(cfg.steps // 10, 1)))
        if not 0 <= warmup < cfg.steps:
            raise ValueError(f"method sft_cosine: warmup={warmup} must be in [0, steps={cfg.steps})")
        optimizer = dict(adamw, schedule="warmup_cosine", warmup_steps=warmup, decay_steps=cfg.steps)
        return [("sft_cosine", "sft_cosine", optimizer, {})]
    if spec.kind == "finch":
        label, optimizer = _finch(cfg, o)
        return [(label, "finch", optimizer, {"lora_rank": _lora_rank(o.get("lora", 0), "finch", allow_zero=True)})]
    if spec.kind == "lora":
        rank, rate = _lora_rank(o.get("rank", 16), "lora"), float(o.get("lr", lr))
        if not rate > 0:
            raise ValueError(f"method lora: lr must be > 0, got {rate}")
        return [(f"lora(r={rank})@{_lr_label(rate)}", "lora", dict(adamw, learning_rate=rate), {"lora_rank": rank})]
    if spec.kind == "sweep":
        lrs = o.get("lrs", [lr / 10, lr / 3])
        return [(f"const@{_lr_label(x)}", "sweep", dict(adamw, learning_rate=x), {"on_front": True}) for x in lrs]
    if spec.kind == "warmup_const":
        frac = float(o.get("frac", 0.3))
        warmup = round(frac * cfg.steps)
        if not 0 < warmup < cfg.steps:
            raise ValueError(f"method warmup_const: frac={frac} gives {warmup} warmup steps of {cfg.steps}")
        # Cosine from the peak to the peak (final ratio 1) is constant: warmup, then the peak to the end.
        optimizer = dict(
            adamw, schedule="warmup_cosine", warmup_steps=warmup, decay_steps=cfg.steps, final_lr_ratio=1.0
        )
        return [(f"warmup{frac:.0%}+const", "warmup_const", optimizer, {})]
    if spec.kind == "warmup_matched":
        replay = o.get("replay", "other")
        if replay not in ("other", "same"):
            raise ValueError(f"method warmup_matched: replay={replay!r} must be 'other' or 'same'")
        extras = {"trace_source": o.get("source", "finch"), "replay": replay}
        return [("warmup_matched", "warmup_matched", dict(adamw, schedule="trace"), extras)]
    if spec.kind == "l2sp":
        weight = float(o.get("weight", 1.0))
        return [(f"l2sp(w={weight:g})", "l2sp", adamw, {"l2sp_weight": weight})]
    threshold = float(o.get("threshold", 6.0))
    return [(f"stm(t={threshold:g})", "stm", adamw, {"stm_threshold": threshold})]


def _lora_rank(value: Any, kind: str, *, allow_zero: bool = False) -> int:
    rank = int(value)
    if rank < (0 if allow_zero else 1):
        raise ValueError(f"method {kind}: the LoRA rank must be >= {0 if allow_zero else 1}, got {rank}")
    return rank


def expand_runs(cfg: CompareConfig) -> list[RunSpec]:
    """The runs of ``cfg`` in execution order; errors (duplicate labels, a missing trace source) before any run.

    The order is seed-major, so complete seeds of every method finish first: all runs of the first seed, then of
    the second, ... A run replaying another run's lr trace goes right after the seed block in which its source
    finished (with ``replay=other`` it replays the next seed's trace of the source, cyclically).
    """
    per_seed: list[tuple[str, str, dict, dict, int, int]] = []  # (label, kind, optimizer, extras, seeds, probes)
    for spec in (parse_method(m) for m in cfg.methods):
        n = int(spec.options.get("seeds", len(cfg.seeds)))
        probes = int(spec.options.get("probe", 0))
        if not 1 <= n <= len(cfg.seeds) or not 0 <= probes <= n:
            raise ValueError(
                f"method {spec.kind}: seeds={n} must be in [1, {len(cfg.seeds)}] and probe={probes} in [0, seeds]"
            )
        per_seed += [(*run, n, probes) for run in _per_seed_runs(cfg, spec)]
    labels = [p[0] for p in per_seed]
    seen: dict[str, str] = {}
    for label, _, optimizer, extras, *_ in per_seed:
        # Same label, or the same training under another name (sft == a sweep point at the same rate).
        for key in (
            label,
            json.dumps([optimizer, {k: v for k, v in extras.items() if k != "on_front"}], sort_keys=True),
        ):
            if key in seen:
                raise ValueError(
                    f"compare: methods give duplicate runs {seen[key]!r} and {label!r}; list each method/lr once"
                )
            seen[key] = label
    source_seeds = {label: n for label, *_, n, _ in per_seed}
    for label, _, _, extras, n, _ in per_seed:
        source = extras.get("trace_source")
        if source is None:
            continue
        if source not in [lab for lab in labels if lab != label]:
            raise ValueError(
                f"method warmup_matched replays the lr trace of {source!r}, which is not among the "
                f"methods (have {labels}); add `finch` (or set source=<label>)"
            )
        if n > source_seeds[source]:
            raise ValueError(
                f"method warmup_matched: seeds={n} is more than its source {source!r} runs ({source_seeds[source]})"
            )

    runs: list[RunSpec] = []
    pending: list[tuple[int, RunSpec]] = []  # replays waiting for the seed block of their trace
    for i, seed in enumerate(cfg.seeds):
        for label, kind, optimizer, extras, n, probes in per_seed:
            if i >= n:
                continue
            extras = dict(extras)
            run = dict(label=label, kind=kind, seed=seed, optimizer=optimizer, probe=i < probes)
            if "trace_source" not in extras:
                runs.append(RunSpec(**run, **extras))
                continue
            mode = extras.pop("replay")
            # "other": the trace of the next seed the source ran with (cyclic): a fixed schedule that did not see
            # this run's own losses. With one seed there is no other; the replay is then the same-seed trace,
            # which reproduces the source run exactly (a check that FINCH acts only through its lr).
            source_n = source_seeds[extras["trace_source"]]
            j = (i + 1) % source_n if mode == "other" else i
            pending.append((max(i, j), RunSpec(**run, **extras, trace_seed=cfg.seeds[j])))
        runs += [r for ready, r in pending if ready <= i]
        pending = [(ready, r) for ready, r in pending if ready > i]
    return runs + [r for _, r in pending]
