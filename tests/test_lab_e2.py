"""scripts/lab_e2_grid.py: the pre-registered run-length rule, the paper's reading and its verdicts, the committed
reports recomputed from the committed run records, and the archive a new machine resumes from."""

import json
import runpy
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
E2 = runpy.run_path(str(ROOT / "scripts" / "lab_e2_grid.py"), run_name="lab_e2_grid")
ARCHIVE = ROOT / "docs" / "results" / "e2_runs"


def _pilot(base: float, losses: list[tuple[int, float]]) -> dict:
    return {
        "base_metrics": {"task_loss": base},
        "runs": [{"checkpoints": [{"step": s, "metrics": {"task_loss": v}} for s, v in losses]}],
    }


@pytest.mark.parametrize(
    "losses, first, steps",
    [
        # 95% of the 5.0-nat improvement is 4.75: first reached at step 36 -> 40.
        ([(12, 8.0), (24, 6.0), (36, 5.2), (48, 5.0), (60, 5.1)], 36, 40),
        # reached at the first evaluation: still at least 30 steps.
        ([(12, 5.0), (24, 5.0)], 12, 30),
        # the lowest loss may come before the end (held-out loss rising again): the rule uses the lowest.
        ([(12, 9.0), (24, 5.0), (36, 6.5)], 24, 30),
        # a step already on a multiple of 10 is kept.
        ([(10, 9.0), (50, 5.3), (60, 5.0)], 60, 60),
    ],
)
def test_run_length_is_the_pre_registered_rule(losses, first, steps):
    choice = E2["run_length"](_pilot(10.0, losses))
    assert (choice["first_95"], choice["steps"]) == (first, steps)
    assert choice["base_task_loss"] == 10.0 and choice["pilot_task_loss"] == losses


def test_spanish_pilot_on_record_gives_its_documented_length():
    pilot = json.loads((ARCHIVE / "pilot-spanish" / "results.json").read_text())
    recorded = json.loads((ARCHIVE / "spanish" / "length.json").read_text())
    choice = E2["run_length"](pilot)
    assert (choice["first_95"], choice["steps"]) == (recorded["first_95"], recorded["steps"]) == (96, 100)


@pytest.mark.parametrize(
    "interval, verdict",
    [
        ((0.31, 0.55), "forgets less"),
        ((0.02, 0.5), "forgets less; the paper's 93% inside"),
        ((0.91, 1.09), "the same"),
        ((1.11, 2.0), "forgets more"),
        ((0.60, 0.91), "inconclusive"),  # spanish's FINCH cap 1e-4: 0.01 over the line
        ((0.85, 1.20), "inconclusive"),
    ],
)
def test_paper_reading_verdicts(interval, verdict):
    assert E2["_sft_verdict"]({"r": sum(interval) / 2, "interval": list(interval), "verdict": "x"}) == verdict


def test_paper_reading_without_an_interval_says_why():
    assert E2["_sft_verdict"](None) == "—"
    assert E2["_sft_verdict"]({"r": 0.72, "verdict": "incomplete (1 seed)"}) == "incomplete (1 seed)"


@pytest.mark.parametrize("domain", ["facts", "science", "spanish"])
def test_committed_report_is_what_its_committed_records_give(domain):
    """docs/results/e2_<domain>.{json,md} recomputed from docs/results/e2_runs/<domain>: the readings, the verdicts
    and the table, with no model loaded."""
    results = json.loads((ARCHIVE / domain / "results.json").read_text())
    length = json.loads((ARCHIVE / domain / "length.json").read_text())
    read = E2["readings"](results)
    committed = json.loads((ROOT / "docs" / "results" / f"e2_{domain}.json").read_text())
    assert json.loads(json.dumps(read)) == committed["readings"]
    assert E2["render"](domain, results, read, length) == (ROOT / "docs" / "results" / f"e2_{domain}.md").read_text()
    # The reading is against SFT (const@1e-4), which has none against itself; FINCH as reported forgets less (in
    # every domain of the grid, docs/results.md).
    assert read["const@1e-4"]["final"]["vs_sft"] is None
    assert read["finch(max_lr=5e-05)"]["final"]["vs_sft"]["interval"][1] < 0.9


def test_archive_keeps_finished_runs_only_and_restore_never_overwrites(tmp_path):
    out, archive = tmp_path / "runs", tmp_path / "archive"
    runs = out / "science" / "runs"
    (runs / "done__seed0").mkdir(parents=True)
    (runs / "done__seed0.json").write_text('{"finished": true}')
    (runs / "done__seed0" / "metrics.jsonl").write_text("{}\n")
    (runs / "half__seed0").mkdir()
    (runs / "half__seed0" / "metrics.jsonl").write_text("{}\n")  # no record: killed mid-run, to be run again
    (out / "science" / "length.json").write_text('{"steps": 80}')
    (out / "science" / "forgetting_vs_task.png").write_bytes(b"png")  # drawn again by --report, not archived

    assert E2["archive"](out, archive) == 3
    kept = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
    assert kept == ["science/length.json", "science/runs/done__seed0.json", "science/runs/done__seed0/metrics.jsonl"]
    assert E2["archive"](out, archive) == 0  # nothing new

    fresh = tmp_path / "new-machine"
    (fresh / "science").mkdir(parents=True)
    (fresh / "science" / "length.json").write_text('{"steps": 80, "local": true}')
    assert E2["restore"](fresh, archive) == 2
    assert json.loads((fresh / "science" / "length.json").read_text())["local"]  # what the machine has stays
    assert (fresh / "science" / "runs" / "done__seed0" / "metrics.jsonl").is_file()
    assert not (fresh / "science" / "runs" / "half__seed0").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--domains", "facts,math", "--status"], "unknown domain(s) math"),
        (["--model", "preset:tiny", "--status"], "needs its own --out"),
        (["--model", "nonsense", "--out", "{tmp}", "--status"], "model 'nonsense'"),
        (["--model", "preset:tiny", "--out", "{tmp}", "--archive"], "--archive keeps the reference grid's records"),
    ],
)
def test_cli_refuses_before_any_work(argv, message, tmp_path, capsys):
    """Another model never writes into the reference grid's folders or archive; a typo costs no model load."""
    with pytest.raises(SystemExit) as exit_:
        E2["main"]([a.replace("{tmp}", str(tmp_path / "out")) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_check_compares_fresh_runs_with_the_committed_report(tmp_path, capsys):
    """`--check`: runs re-made elsewhere agree with the committed report to the last bit, and one changed number in
    one run's record is named."""
    out = tmp_path / "runs"
    shutil.copytree(ARCHIVE / "facts", out / "facts")
    empty_cache = str(tmp_path / "no-prepared-data")  # facts and the retain fingerprints need none
    assert E2["check"]("facts", out, empty_cache) == 0
    assert "84 per-seed ratios of 8 arms compared, 0 differ" in capsys.readouterr().out

    record_path = out / "facts" / "runs" / "finch__seed1.json"
    record = json.loads(record_path.read_text())
    final = record["checkpoints"][-1]
    final["retain_kl_sums"] = [v * 1.001 for v in final["retain_kl_sums"]]
    record_path.write_text(json.dumps(record))
    assert E2["check"]("facts", out, empty_cache) == 1
    printed = capsys.readouterr().out
    assert "differs: finch final vs_sft seed 1" in printed and "finch final vs_front seed 1" in printed
    assert "seed 0" not in printed.split("differ\n", 1)[1]
