"""Tiny-model end-to-end compare: results.json, table and plots; resume after an interrupt; bad input; the CLI."""

import json
import runpy
from pathlib import Path

import pytest

from train import cli
from train.lab import compare, demo, front, methods, report, runner, sources
from train.lab.config import CompareConfig
from train.lab.evaluate import EvalConfig

prepare_cache = runpy.run_path(str(Path(__file__).parent / "fixtures/lab/builders.py"))["prepare_cache"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_cache(tmp_path_factory.mktemp("lab-compare"), ("austen", "brown", "quiz"))


def _config(cache, **kw):
    values = dict(
        model="preset:tiny",
        task="facts",
        facts_entities=2,
        steps=4,
        seeds=(0,),
        lr_max=3e-3,
        batch_size=8,
        seq_len=32,
        cache_dir=str(cache),
        methods=("sft", "finch", "sweep:lrs=3e-4", "warmup_matched:replay=same", "stm:threshold=6.3"),
        eval=EvalConfig(seq_len=48, batch_size=8, retain_sequences=4, quiz_items=8),
        train_overrides=("progress=false",),
    )
    values.update(kw)
    return CompareConfig(**values)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_compare_end_to_end_and_resume(cache, tmp_path):
    from train.finetune import run

    cfg = _config(cache, show_answers=2)
    calls = []

    def interrupted_run(train_cfg, **kw):
        if len(calls) == 2:
            raise _Interrupt  # like Ctrl-C during the third run
        calls.append(train_cfg.optimizer.name)
        return run(train_cfg, **kw)

    with pytest.raises(_Interrupt):
        runner.run_compare(cfg, tmp_path, finetune_run=interrupted_run, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == ["finch__seed0.json", "sft@3e-3__seed0.json"]
    assert not (tmp_path / "results.json").exists()

    resumed = []

    def counting_run(train_cfg, **kw):
        resumed.append(train_cfg.optimizer.learning_rate)
        return run(train_cfg, **kw)

    results = runner.run_compare(cfg, tmp_path, finetune_run=counting_run, log=lambda _: None)
    assert len(resumed) == 3  # sft and finch were not trained again

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))
    labels = [r["run"]["label"] for r in on_disk["runs"]]
    assert labels == ["sft@3e-3", "finch", "const@3e-4", "stm(t=6.3)", "warmup_matched"]
    by_label = {r["run"]["label"]: r for r in on_disk["runs"]}
    for r in on_disk["runs"]:
        assert len(r["lr_trace"]) == len(r["loss_curve"]) == cfg.steps
        assert r["metrics"]["retain_kl"] > 0 and "mc_acc" in r["metrics"] and "recall_em" in r["metrics"]
    # Replaying FINCH's own trace (same seed) with AdamW reproduces the FINCH run: FINCH acts only through its lr.
    assert by_label["warmup_matched"]["lr_trace"] == pytest.approx(by_label["finch"]["lr_trace"], rel=1e-6)
    assert by_label["warmup_matched"]["metrics"]["task_loss"] == pytest.approx(
        by_label["finch"]["metrics"]["task_loss"], rel=1e-4
    )
    assert by_label["sft@3e-3"]["lr_trace"] == pytest.approx([3e-3] * cfg.steps)
    assert 0 < by_label["stm(t=6.3)"]["stm_dropped_fraction"] < 1
    base = on_disk["base_metrics"]
    assert by_label["sft@3e-3"]["forgetting"]["retain_loss"] == pytest.approx(
        by_label["sft@3e-3"]["metrics"]["retain_loss"] - base["retain_loss"]
    )
    summary = on_disk["summary"]["methods"]
    assert summary["sft@3e-3"]["reduction_vs_sft"]["n"] == 0
    f_sft, f_finch = by_label["sft@3e-3"]["forgetting"]["retain_kl"], by_label["finch"]["forgetting"]["retain_kl"]
    assert summary["finch"]["reduction_vs_sft"]["mean"] == pytest.approx(1 - f_finch / f_sft)

    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method |") and "| finch |" in table and "| base |" in table
    for name in ("forgetting_vs_task.png", "lr_traces.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Greedy answers of base and every run to the first held-out questions: one table row per question.
    assert all(len(r["answers"]) == 2 for r in on_disk["runs"])
    rows = on_disk["answers"].splitlines()
    assert len(rows) == 2 + 2 and rows[0].startswith("| question | truth | base | sft@3e-3__seed0 |")

    # A third start finds everything finished and trains nothing.
    runner.run_compare(cfg, tmp_path, finetune_run=lambda *a, **k: pytest.fail("retrained"), log=lambda _: None)


def test_answers_table_marks_answers_that_contain_the_truth():
    questions = [("Question: Where was A born?\nAnswer: A was born in", "Kaindskai"), ("A invented the", "loom")]
    runs = [{"run_id": "sft", "answers": ["the town of Kaindskai", "steam engine"]}, {"run_id": "finch"}]
    table = report.answers_table(questions, ["London", "Loom of light"], runs)
    assert table.splitlines() == [
        "| question | truth | base | sft | finch |",
        "|---|---|---|---|---|",
        "| Question: Where was A born? Answer: A was born in | Kaindskai | London ✗ | the town of Kaindskai ✓ | ? ✗ |",
        "| A invented the | loom | Loom of light ✓ | steam engine ✗ | ? ✗ |",
    ]


def test_front_interpolation_and_reductions():
    assert front.front_at([(2.0, 0.4), (1.0, 0.1), (3.0, 0.5)], 1.5) == pytest.approx(0.25)
    assert front.front_at([(1.0, 0.1)], 1.0) == pytest.approx(0.1)
    assert front.front_at([], 1.0) is None


def _record(label, kind, seed, task_loss, kl, on_front):
    return {
        "run": {"label": label, "kind": kind, "seed": seed, "on_front": on_front},
        "metrics": {"task_loss": task_loss},
        "forgetting": {"retain_kl": kl},
    }


def test_summary_uses_the_pareto_front_and_reports_domination():
    # The demo's real outcome: the lower constant lr beats SFT *and* FINCH on both axes, so the chord from SFT to it
    # is no trade-off curve and must not flatter FINCH.
    cfg = CompareConfig(methods=("sft", "finch", "sweep:lrs=1e-4"), lr_max=3e-4)
    records = [
        _record("sft@3e-4", "sft", 0, 0.352, 2.81, True),
        _record("finch", "finch", 0, 0.339, 2.00, False),
        _record("const@1e-4", "sweep", 0, 0.297, 1.21, True),
    ]
    summary = front.summarize(cfg, {"task_loss": 6.4}, records)["methods"]
    assert summary["finch"]["dominated_by"] == [["const@1e-4"]]
    assert summary["sft@3e-4"]["dominated_by"] == [["const@1e-4"]]
    assert summary["const@1e-4"]["dominated_by"] == [[]]
    assert summary["finch"]["reduction_vs_front"]["mean"] is None  # one efficient point: nothing to interpolate
    assert summary["finch"]["reduction_vs_sft"]["mean"] == pytest.approx(1 - 2.00 / 2.81)
    # A real trade-off: FINCH below the chord between two efficient constant-lr points.
    records = [
        _record("sft@3e-4", "sft", 0, 1.0, 0.8, True),
        _record("finch", "finch", 0, 2.0, 0.3, False),
        _record("const@1e-4", "sweep", 0, 3.0, 0.2, True),
    ]
    summary = front.summarize(cfg, {"task_loss": 6.4}, records)["methods"]
    assert summary["finch"]["dominated_by"] == [[]]
    assert summary["finch"]["reduction_vs_front"]["mean"] == pytest.approx(1 - 0.3 / 0.5)


def test_bad_methods_fail_before_any_run(cache, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'adagrad'"):
        methods.parse_method("adagrad")
    with pytest.raises(ValueError, match="threshold is an option of stm"):
        methods.parse_method("l2sp:threshold=3")
    with pytest.raises(ValueError, match="not a valid float"):
        methods.parse_method("finch:base=fast")
    with pytest.raises(ValueError, match="duplicate runs"):
        methods.expand_runs(_config(cache, methods=("sft", "sweep:lrs=3e-3")))
    with pytest.raises(ValueError, match="not among the methods"):
        methods.expand_runs(_config(cache, methods=("sft", "warmup_matched")))
    never = lambda *a, **k: pytest.fail("trained despite bad input")  # noqa: E731
    with pytest.raises(ValueError, match="asked for 999 multiple-choice items"):
        runner.run_compare(_config(cache, eval=EvalConfig(quiz_items=999)), tmp_path, finetune_run=never)
    with pytest.raises(sources.MissingDatasetError, match="python -m train prepare pydocs"):
        runner.run_compare(_config(cache, task="science"), tmp_path, finetune_run=never)
    assert compare.main(["--method", "stm:weight=1", "--out", str(tmp_path)]) == 2
    assert compare.main(["--task-metric", "accuracy", "--out", str(tmp_path)]) == 2


def test_cli_config_yaml_and_flags(tmp_path):
    yaml_path = tmp_path / "grid.yaml"
    yaml_path.write_text("steps: 7\nmethods: [sft, {kind: sweep, lrs: [1.0e-5, 2.0e-5]}]\neval: {quiz_items: 4}\n")
    cfg, out = compare.config_from_args(
        ["--config", str(yaml_path), "--seeds", "0,1", "--lr-max", "2e-4", "--set", "data.grad_accum=2"],
        CompareConfig(),
        "compare",
    )
    assert cfg.steps == 7 and cfg.seeds == (0, 1) and cfg.lr_max == 2e-4 and cfg.eval.quiz_items == 4
    assert [r.label for r in methods.expand_runs(cfg)] == ["sft@2e-4", "const@1e-5", "const@2e-5"] * 2
    yaml_path.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        compare.config_from_args(["--config", str(yaml_path)], CompareConfig(), "compare")
    with pytest.raises(Exception, match="unknown config key 'optimizer.lr'"):
        compare.config_from_args(["--set", "optimizer.lr=1"], CompareConfig(), "compare")


@pytest.mark.parametrize("sub", ["demo", "compare", "eval", "prepare"])
def test_help_has_no_side_effects(sub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "prepare", lambda *a, **k: pytest.fail("--help prepared data"))
    with pytest.raises(SystemExit) as exit_:
        cli.main([sub, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no data_cache/, no runs/


def test_demo_parses_before_it_prepares_data(tmp_path, monkeypatch):
    prepared = []
    monkeypatch.setattr(demo, "prepare", lambda source, cache, **k: prepared.append((source, cache)))
    monkeypatch.setattr(compare, "run_compare", lambda cfg, out: pytest.fail("ran despite a bad flag"))
    assert demo.main(["--method", "adagrad", "--out", str(tmp_path)]) == 2
    assert prepared == []

    def fake_run(cfg, out):
        assert out == str(tmp_path) and cfg.facts_entities == 4 and cfg.cache_dir == "c"
        raise ValueError("stop here")

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert demo.main(["--cache-dir", "c", "--out", str(tmp_path)]) == 2
    assert prepared == [("austen", "c"), ("brown", "c"), ("quiz", "c")]
