"""The method grammar and its expansion: FINCH's L*, warmup+constant, per-method seeds, and the seed-major order
with each lr-trace replay right after the seed block its source finished in."""

import math
import runpy
from pathlib import Path

import pytest

from train.config import OptimizerConfig
from train.lab import methods
from train.lab.config import CompareConfig
from train.optimizers import make_schedule


def _cfg(*ms, seeds=(0, 1, 2), **kw):
    return CompareConfig(model="preset:tiny", methods=ms, seeds=seeds, max_learning_rate=1e-4, steps=60, **kw)


def test_finch_options_and_labels():
    runs = methods.expand_runs(
        _cfg("finch", "finch:lstar=0.25", "finch:ema=0", "finch:direction=sgd,max_learning_rate=0.1", seeds=(0,))
    )
    by = {r.label: r.optimizer for r in runs}
    assert list(by) == ["finch", "finch(L*=0.25)", "finch(ema=0)", "finch_sgd(max_lr=0.1)"]
    assert by["finch"]["base_learning_rate"] == pytest.approx(1e-4) and by["finch"]["ema_decay"] == 0.9
    # base_learning_rate = max_learning_rate * sqrt(L*): the cap is reached once the running loss is <= L*.
    assert by["finch(L*=0.25)"]["base_learning_rate"] == pytest.approx(5e-5)
    assert by["finch(L*=0.25)"]["max_learning_rate"] == pytest.approx(1e-4)
    assert by["finch(ema=0)"]["ema_decay"] == 0.0
    assert by["finch_sgd(max_lr=0.1)"]["name"] == "finch_sgd"
    assert by["finch_sgd(max_lr=0.1)"]["base_learning_rate"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="base_learning_rate or lstar, not both"):
        methods.expand_runs(_cfg("finch:base_learning_rate=1e-5,lstar=0.5"))
    with pytest.raises(ValueError, match="direction='rmsprop'"):
        methods.expand_runs(_cfg("finch:direction=rmsprop"))


def test_warmup_const_warms_up_linearly_then_holds_the_peak():
    (run,) = methods.expand_runs(_cfg("warmup_const", seeds=(0,)))
    assert run.label == "warmup30%+const" and run.optimizer["warmup_steps"] == 18
    opt = OptimizerConfig(**{k: v for k, v in run.optimizer.items()})
    schedule = make_schedule(opt, 60, peak=1e-4)
    lrs = [float(schedule(t)) for t in range(60)]
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(0.5e-4, rel=1e-5)
    assert all(lr == pytest.approx(1e-4, rel=1e-6) for lr in lrs[18:])
    with pytest.raises(ValueError, match="warmup steps"):
        methods.expand_runs(_cfg("warmup_const:frac=1.0"))


def test_seed_major_order_per_method_seeds_and_replays_after_their_source():
    cfg = _cfg("finch:probe=1", "sweep:lrs=5e-5,seeds=2", "warmup_matched")
    order = [r.run_id for r in methods.expand_runs(cfg)]
    assert order == [
        "finch__seed0",
        "const@5e-5__seed0",
        "finch__seed1",
        "const@5e-5__seed1",
        "warmup_matched__seed0",  # replays finch seed 1: runs as soon as that exists
        "finch__seed2",
        "warmup_matched__seed1",
        "warmup_matched__seed2",  # replays finch seed 0 (cyclic)
    ]
    runs = {r.run_id: r for r in methods.expand_runs(cfg)}
    assert [runs[f"warmup_matched__seed{s}"].trace_seed for s in range(3)] == [1, 2, 0]
    assert runs["finch__seed0"].probe and not runs["finch__seed1"].probe
    assert runs["const@5e-5__seed0"].on_front and not runs["finch__seed0"].on_front
    # The replay cycles over the seeds its source ran with.
    limited = {r.run_id: r for r in methods.expand_runs(_cfg("finch:seeds=2", "warmup_matched:seeds=2"))}
    assert limited["warmup_matched__seed1"].trace_seed == 0 and "finch__seed2" not in limited
    with pytest.raises(ValueError, match="more than its source"):
        methods.expand_runs(_cfg("finch:seeds=2", "warmup_matched"))
    with pytest.raises(ValueError, match=r"seeds=4 must be in \[1, 3\]"):
        methods.expand_runs(_cfg("finch:seeds=4"))


def test_lr_labels_are_short_and_distinct():
    runs = methods.expand_runs(_cfg("sweep:lrs=2.5e-5/3.5e-5/1e-4/1.4e-4", seeds=(0,)))
    assert [r.label for r in runs] == ["const@2.5e-5", "const@3.5e-5", "const@1e-4", "const@1.4e-4"]


def test_e1_grid_is_the_preregistered_design():
    grid = runpy.run_path(str(Path(__file__).parent.parent / "scripts" / "lab_e1_grid.py"))
    cfg = grid["config"](grid["full_methods"]([5e-5, 7e-5]))
    runs = methods.expand_runs(cfg)
    seeds: dict[str, list[int]] = {}
    for r in runs:
        seeds.setdefault(r.label, []).append(r.seed)
    assert {lab: len(s) for lab, s in seeds.items()} == {
        "finch": 5,
        "const@5e-5": 5,
        "const@7e-5": 5,
        "const@2.5e-5": 3,
        "const@3.5e-5": 3,
        "const@1e-4": 3,
        "const@1.4e-4": 3,
        "finch(L*=0.25)": 3,
        "finch(ema=0)": 3,
        "warmup30%+const": 3,
        "finch_sgd(max_lr=0.1)": 1,
        "warmup_matched": 5,
    }
    assert len(runs) == 42 and [r.seed for r in runs[:11]] == [0] * 11  # seed 0 of every arm first
    assert cfg.eval_steps == [12, 24, 36, 48, 60] and cfg.eval.retain_sequences >= 32 and cfg.eval.quiz_items >= 256
    assert math.isclose(runs[0].optimizer["base_learning_rate"], 1e-4)
