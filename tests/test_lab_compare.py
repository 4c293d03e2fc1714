"""Tiny-model end-to-end compare: results.json, table and plots; resume after an interrupt; bad input; the CLI."""

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from train import cli
from train.lab import compare, demo, methods, report, runner, sources, summary
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
        max_learning_rate=3e-3,
        batch_size=8,
        seq_len=96,
        eval_every=2,
        bootstrap=50,
        probe_windows=2,
        cache_dir=str(cache),
        methods=("sweep:lrs=3e-3", "finch:probe=1", "stm:threshold=6.3", "warmup_matched:replay=same"),
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
    stored = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert stored == ["const@3e-3__seed0.json", "finch__seed0.json"]
    assert not (tmp_path / "results.json").exists()
    done, left, _ = runner.progress(cfg, tmp_path)
    assert done == ["const@3e-3__seed0", "finch__seed0"] and left == ["stm(t=6.3)__seed0", "warmup_matched__seed0"]

    resumed = []

    def counting_run(train_cfg, **kw):
        resumed.append(train_cfg.optimizer.learning_rate)
        return run(train_cfg, **kw)

    results = runner.run_compare(cfg, tmp_path, finetune_run=counting_run, log=lambda _: None)
    assert len(resumed) == 2  # the first two runs were not trained again

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))
    labels = [r["run"]["label"] for r in on_disk["runs"]]
    assert labels == ["const@3e-3", "finch", "stm(t=6.3)", "warmup_matched"]
    by_label = {r["run"]["label"]: r for r in on_disk["runs"]}
    for r in on_disk["runs"]:
        assert len(r["lr_trace"]) == len(r["loss_curve"]) == cfg.steps
        # Every eval_every-th checkpoint is kept; the quiz only at the end.
        assert [c["step"] for c in r["checkpoints"]] == [2, 4]
        assert [c["cum_lr"] for c in r["checkpoints"]] == pytest.approx([sum(r["lr_trace"][:2]), sum(r["lr_trace"])])
        assert "mc_acc" not in r["checkpoints"][0]["metrics"] and "mc_acc" in r["checkpoints"][1]["metrics"]
        assert len(r["checkpoints"][0]["retain_kl_sums"]) == 4
        assert r["metrics"]["retain_kl"] > 0 and "recall_em" in r["metrics"]
    # Replaying FINCH's own trace (same seed) with AdamW reproduces the FINCH run: FINCH acts only through its lr.
    assert by_label["warmup_matched"]["lr_trace"] == pytest.approx(by_label["finch"]["lr_trace"], rel=1e-6)
    assert by_label["warmup_matched"]["metrics"]["task_loss"] == pytest.approx(
        by_label["finch"]["metrics"]["task_loss"], rel=1e-4
    )
    assert by_label["const@3e-3"]["lr_trace"] == pytest.approx([3e-3] * cfg.steps)
    assert 0 < by_label["stm(t=6.3)"]["stm_dropped_fraction"] < 1
    # The per-step probe: one record per step, KL to the base growing from 0, the step's own drift positive.
    probe = by_label["finch"]["probe"]
    assert [p["step"] for p in probe] == [1, 2, 3, 4] and "probe" not in by_label["const@3e-3"]
    assert 0 < probe[0]["kl_base"] < probe[-1]["kl_base"] and probe[0]["kl_step"] == pytest.approx(probe[0]["kl_base"])
    assert all(p["kl_step"] > 0 and p["lr"] > 0 and p["loss"] > 0 for p in probe)
    summary = on_disk["summary"]["methods"]
    assert summary["finch"]["ratio"]["n"] + len(summary["finch"]["ratio"]["outside_front"]) == 1
    assert summary["const@3e-3"]["on_front"] and on_disk["summary"]["sft_label"] == "const@3e-3"

    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method |") and "| finch |" in table and "| base |" in table
    for name in ("forgetting_vs_task.png", "cumulative_lr.png", "probe.png", "lr_traces.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Greedy answers of base and every run to the first held-out questions: one table row per question.
    assert all(len(r["answers"]) == 2 for r in on_disk["runs"])
    rows = on_disk["answers"].splitlines()
    assert len(rows) == 2 + 2 and rows[0].startswith("| question | truth | base | const@3e-3__seed0 |")

    # A third start finds everything finished and trains nothing; the partial report needs no model either.
    runner.run_compare(cfg, tmp_path, finetune_run=lambda *a, **k: pytest.fail("retrained"), log=lambda _: None)
    partial = runner.report_finished(cfg, tmp_path)
    assert len(partial["runs"]) == 4 and (tmp_path / "report" / "results.md").is_file()
    # A record scored on other eval rows (e.g. windows drawn differently) is stale, not silently mixed in.
    record_path = tmp_path / "runs" / "finch__seed0.json"
    fingerprint = json.loads(record_path.read_text())["fingerprint"]
    eval_hash = json.loads(record_path.read_text())["eval_hash"]
    assert runner._load_if_fresh(record_path, fingerprint, eval_hash) is not None
    assert runner._load_if_fresh(record_path, fingerprint, "another-eval-set") is None


def test_lora_and_finch_on_lora_are_arms_of_the_facts_comparison(cache, tmp_path):
    cfg = _config(
        cache,
        methods=("lora:rank=4,lr=3e-2", "finch:lora=4,max_learning_rate=3e-2"),
        steps=3,
        eval_every=0,
        eval=EvalConfig(seq_len=48, batch_size=8, retain_sequences=4, quiz_items=0),
    )
    results = runner.run_compare(cfg, tmp_path, log=lambda _: None)
    by_label = {r["run"]["label"]: r for r in results["runs"]}
    assert sorted(by_label) == ["finch(max_lr=0.03, lora=4)", "lora(r=4)@3e-2"]
    for r in results["runs"]:
        assert r["run"]["lora_rank"] == 4
        # The adapters moved the model away from the base (B starts at zero, so any KL is the adapters' doing).
        assert r["metrics"]["retain_kl"] > 0 and r["loss_curve"][-1] < r["loss_curve"][0]
    assert by_label["lora(r=4)@3e-2"]["lr_trace"] == pytest.approx([3e-2] * cfg.steps)


@pytest.mark.slow
def test_compare_runs_on_user_files(tmp_path, capsys):
    task = tmp_path / "qa.jsonl"
    task.write_text(
        "\n".join(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(30))
    )
    retain = tmp_path / "retain.txt"
    retain.write_text(
        "\n\n".join(f"Paragraph {i} of plain English text about rivers and hills. " * 6 for i in range(8))
    )
    args = ["--model", "preset:tiny", "--task", f"file:{task}", "--retain", f"file:{retain}", "--steps", "2"]
    args += ["--seq-len", "64", "--batch-size", "8", "--eval-seq-len", "64", "--eval-retain-sequences", "4"]
    args += [
        "--eval-quiz-items",
        "0",
        "--method",
        "sweep:lrs=1e-3",
        "--method",
        "finch:max_learning_rate=3e-3",
        "--set",
        "progress=false",
    ]
    assert compare.main([*args, "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["retain"] == f"file:{retain}" and len(results["runs"]) == 2
    assert "mc_acc" not in results["base_metrics"] and results["runs"][1]["metrics"]["retain_kl"] > 0
    assert compare.main([*args, "--retain", f"file:{tmp_path / 'nope.txt'}", "--out", str(tmp_path / "x")]) == 2
    assert "retain file" in capsys.readouterr().err


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


def _record(label, seed, task_loss, kl_b, on_front, lr=1e-4):
    """A run record with one checkpoint whose 2 retain windows are A (window 0) and B (window 1)."""
    checkpoint = {
        "step": 4,
        "metrics": {"task_loss": task_loss},
        "retain_kl_sums": [kl_b, kl_b],
        "retain_tokens": [1, 1],
    }
    return {
        "run": {
            "label": label,
            "kind": "sweep" if on_front else "finch",
            "seed": seed,
            "on_front": on_front,
            "optimizer": {"learning_rate": lr},
        },
        "metrics": {"task_loss": task_loss, "retain_kl_B": kl_b},
        "checkpoints": [checkpoint],
        "lr_trace": [lr] * 4,
        "train_s": 1.0,
    }


def test_summary_reads_each_method_against_its_seeds_front():
    cfg = CompareConfig(methods=("sweep:lrs=1e-4/3e-5", "finch"), max_learning_rate=1e-4, seeds=(0, 1), bootstrap=0)
    base = {
        "metrics": {"task_loss": 6.0},
        "checkpoint": {"metrics": {"task_loss": 6.0}, "retain_kl_sums": [0, 0], "retain_tokens": [1, 1]},
    }
    records = []
    for seed in (0, 1):
        records += [_record("const@1e-4", seed, 1.0, 0.8, True), _record("const@3e-5", seed, 3.0, 0.2, True, 3e-5)]
    records += [_record("finch", 0, 2.0, 0.3, False), _record("finch", 1, 2.0, 0.4, False)]
    halves = (np.array([0]), np.array([1]))
    s = summary.summarize(cfg, base, records, halves)
    assert s["sft_label"] == "const@1e-4"
    finch = s["methods"]["finch"]
    front_at_2 = math.sqrt(0.8 * 0.2)  # geometric between the envelope points at task 1 and 3
    assert finch["per_seed"][0]["r"] == pytest.approx(0.3 / front_at_2)
    assert finch["ratio"]["r"] == pytest.approx(math.sqrt(0.3 * 0.4) / front_at_2)
    assert finch["ratio"]["n"] == 2 and finch["ratio"]["t_interval"] is not None
    assert finch["f_vs_sft"] == pytest.approx(math.sqrt(0.3 / 0.8 * 0.4 / 0.8))
    # A constant-lr arm is read against the others: const@3e-5 at task 3 lies between base (6, 0) and const@1e-4.
    assert s["methods"]["const@3e-5"]["per_seed"][0]["f_front"] == pytest.approx(0.8 * 3 / 5)


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
    assert compare.main(["--eval-every", "-1", "--out", str(tmp_path)]) == 2


def test_cli_config_yaml_and_flags(tmp_path):
    yaml_path = tmp_path / "grid.yaml"
    yaml_path.write_text("steps: 7\nmethods: [sft, {kind: sweep, lrs: [1.0e-5, 2.0e-5]}]\neval: {quiz_items: 4}\n")
    cfg, out = compare.config_from_args(
        ["--config", str(yaml_path), "--seeds", "0,1", "--max-learning-rate", "2e-4", "--set", "data.grad_accum=2"],
        CompareConfig(),
        "compare",
    )
    assert cfg.steps == 7 and cfg.seeds == (0, 1) and cfg.max_learning_rate == 2e-4 and cfg.eval.quiz_items == 4
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
