"""End-to-end CLI run on the tiny model, generation from its checkpoint, and bad input failing before training."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train import cli

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(directory):
    """{relative path: (size, sha1)} of every file: proves a failed run did not touch a checkpoint."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`finch-train finetune --config run.yaml key=value...` on the tiny model, in this process."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Q: {i} plus {i}?", "completion": f" A: {2 * i}."}
                if i % 3
                else {"text": f"Counting: {i}, {i + 1}, {i + 2}."}
            )
            + "\n"
            for i in range(60)
        )
    )
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"source": "preset:tiny"},
                "data": {"train_files": [str(data)], "seq_len": 64, "batch_size": 8},
                "optimizer": {"name": "finch_adamw", "max_learning_rate": 3e-3, "base_learning_rate": 3e-3},
                "steps": 5,
                "progress": False,
            }
        )
    )
    run_dir = root / "run"
    argv = [
        "finetune",
        "--config",
        str(config),
        f"output.dir={run_dir}",
        f"checkpoint.directory={run_dir}/ckpt",
        "checkpoint.every=2",
    ]
    assert cli.main(argv) == 0
    return {"root": root, "data": data, "config": config, "run_dir": run_dir, "argv": argv}


@pytest.mark.slow
def test_finetune_cli_writes_metrics_tensorboard_config_and_checkpoints(finished_run):
    run_dir = finished_run["run_dir"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert {"loss", "tokens", "loss_tokens", "grad_norm", "lr", "lr_sqrt_loss"} <= r.keys()
        assert 0 < r["lr"] <= 3e-3
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert any((run_dir / "tensorboard").iterdir())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 5
    # the step folders, beside the run lock (`.finch-train.lock`, emptied when the run ends)
    assert sorted(n for n in os.listdir(run_dir / "ckpt") if not n.startswith(".")) == ["2", "4", "5"]


def test_generate_from_the_checkpoint(finished_run, capsys):
    run_dir = finished_run["run_dir"]
    assert (
        cli.main(
            ["generate", "--checkpoint", str(run_dir / "ckpt"), "--prompt", "Q: 3 plus 3?", "--max-new-tokens", "4"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Q: 3 plus 3?")


def test_rerun_of_a_finished_run_trains_nothing(finished_run, capsys):
    assert cli.main(finished_run["argv"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_python_dash_m_train_help():
    out = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "finetune" in out.stdout


@pytest.mark.parametrize(
    "change, fragment",
    [
        (["data.train_files=[/nonexistent/train.jsonl]"], "does not exist"),
        (["data.train_files=[{bad}]"], ":2: not valid JSON"),
        (["data.train_files=[{empty}]"], "hold no documents"),
        (["data.seq_len=1024"], "longer than the model's context of 512"),
        (["data.batch_size=12"], "does not divide into data.grad_accum=1 micro-batches over 8 data-parallel devices"),
        (["mesh.data=3"], "8 devices do not divide by the fixed axes' product 3"),  # default fsdp=-1 fills the rest
        (["optimizer.name=adam"], "optimizer.name='adam' is unknown"),
        (["optimizer.lernin_rate=1"], "unknown config key 'optimizer.lernin_rate'"),
        (["l2sp_weight=0.1", "steps=8"], "l2sp_weight: 0.0 -> 0.1"),  # a changed setting on resume: refused with a diff
        (["checkpoint.resume=false", "steps=8"], "already holds checkpoints"),
    ],
)
def test_bad_input_fails_before_training_and_leaves_checkpoints_alone(finished_run, capsys, change, fragment):
    root = finished_run["root"]
    bad, empty = root / "bad.jsonl", root / "empty.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    empty.write_text("\n")
    ckpt = finished_run["run_dir"] / "ckpt"
    before = _snapshot(ckpt)
    change = [c.format(bad=bad, empty=empty) for c in change]
    assert cli.main(finished_run["argv"] + change) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert _snapshot(ckpt) == before


# The reads still in flight when the restore fails are cancelled before orbax closes its loop (train/orbax_loop.py):
# none of them may report to the closed loop afterwards.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_a_clear_error_and_is_left_as_is(finished_run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(finished_run["run_dir"] / "ckpt", ckpt)
    # Garble the array store of the newest step (a disk error or a tampered file).
    for path in (ckpt / "5" / "state").rglob("*"):
        if path.is_file() and "d" in path.relative_to(ckpt / "5" / "state").parts[:1]:
            path.write_bytes(b"\x00garbage" * 8)
    before = _snapshot(ckpt)
    argv = [a for a in finished_run["argv"] if not a.startswith("checkpoint.directory=")]
    assert cli.main(argv + [f"checkpoint.directory={ckpt}", "steps=8", f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "could not be restored" in err, err
    assert _snapshot(ckpt) == before
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no step ran


def test_run_from_python_with_documents_and_a_row_transform(tmp_path):
    """The in-memory path the forgetting lab uses: documents instead of files, loss weights re-written per row."""
    import dataclasses as dc

    import numpy as np

    from train.config import DataConfig, OptimizerConfig, OutputConfig, TrainConfig
    from train.data import Document
    from train.finetune import run

    seen = {}

    def keep_first_half(rows):
        mask = rows.loss_mask.copy()
        mask[:, rows.loss_mask.shape[1] // 2 :] = 0.0
        seen["kept"] = mask
        return dc.replace(rows, loss_mask=mask)

    cfg = TrainConfig(
        data=DataConfig(seq_len=16, batch_size=8),
        optimizer=OptimizerConfig(name="adamw"),
        output=OutputConfig(dir=str(tmp_path)),
        steps=2,
        progress=False,
        tensorboard=False,
    )
    docs = [Document(text=f" doc {i}", prompt="p:") for i in range(20)]
    result = run(cfg, documents=docs, transform_rows=keep_first_half)
    assert [m["step"] for m in result.metrics] == [1, 2] and result.start_step == 0
    assert result.lr_trace == [m["lr"] for m in result.metrics]
    assert all(m["loss_tokens"] <= 8 * 8 for m in result.metrics)  # only the first 8 positions of 8 rows count
    assert seen["kept"][:, 8:].sum() == 0 and np.isfinite(result.losses).all()
    assert result.model is not None
