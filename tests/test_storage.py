"""Object storage: the path layer, the run lock on gs:// and URL checks, against a local GCS emulator (no network).

The emulator is fake-gcs-server on 127.0.0.1 (the ``gcs_emulator`` fixture of conftest). The end-to-end run on it
(train, ``kill -9``, resume bit for bit, a corrupted object, a second writer) is in test_train_gcs.py.
"""

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

import models
from train import runlock, storage
from train.config import load_config
from train.run_folder import default_name, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "location, message",
    [
        ("s3://bucket/run", "s3:// is not supported"),
        ("hdfs://host/run", "hdfs:// is not supported"),
        ("gs:///run", "no bucket"),
    ],
)
def test_unsupported_urls_are_storage_errors(location, message):
    with pytest.raises(storage.StorageError, match=message):
        storage.check(location, "output.dir")


def test_half_configured_emulator_is_refused(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    with pytest.raises(storage.StorageError, match="TENSORSTORE_GCS_HTTP_URL is not"):
        storage.check("gs://b/run", "checkpoint.directory")


def test_join_keeps_urls_as_urls_and_local_paths_local():
    assert storage.join("gs://b/runs/", "x", "/y") == "gs://b/runs/x/y"
    assert storage.join("runs", "x") == os.path.join("runs", "x")
    cfg = resolve(load_config(None, ["model.source=preset:tiny", "output.dir=gs://b/run"]))
    assert cfg.checkpoint.directory == "gs://b/run/checkpoints"


@pytest.mark.parametrize(
    "source, name",
    [
        ("hf:/m/Qwen2.5-0.5B", "Qwen2.5-0.5B-chat"),
        ("hf:/m/Qwen2.5-0.5B-Instruct/", "Qwen2.5-0.5B-Instruct-chat"),
        ("gguf:/m/SmolLM2-135M.Q8_0.gguf", "SmolLM2-135M.Q8_0-chat"),
        ("preset:tiny", "tiny-chat"),
    ],
)
def test_run_folder_names_keep_the_whole_model_name(source, name):
    cfg = load_config(None, [f"model.source={source}", "data.train_files=[data/chat.jsonl]"])
    assert default_name(cfg) == name


def test_bucket_that_does_not_exist_is_refused(gcs_emulator):
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match="bucket no-such-bucket does not exist"):
        storage.check("gs://no-such-bucket/run", "output.dir")
    assert time.perf_counter() - t0 < 10


def test_staged_folder_uploads_what_changed_and_a_resume_pulls_it_back(gcs_bucket):
    storage.check(gcs_bucket + "/run", "output.dir")
    folder = storage.StagedFolder(gcs_bucket + "/run")
    assert folder.staged and folder.pull() == []
    with open(os.path.join(folder.local, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    os.makedirs(os.path.join(folder.local, "tensorboard"))
    Path(folder.local, "tensorboard", "events").write_bytes(b"\x00" * 10)
    assert folder.push() == 2
    assert folder.push() == 0  # nothing changed
    with open(os.path.join(folder.local, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2}\n')
    assert folder.push() == 1
    folder.close()
    assert not os.path.exists(folder.local)
    assert storage.read_text(gcs_bucket + "/run/metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'
    assert storage.path(gcs_bucket + "/run/tensorboard/events").read_bytes() == b"\x00" * 10
    # A resume (here after a leftover staging folder of a killed run) starts from what the bucket holds.
    again = storage.StagedFolder(gcs_bucket + "/run")
    os.makedirs(again.local)
    Path(again.local, "stale.txt").write_text("left by a killed run")
    assert again.pull() == ["metrics.jsonl"]
    assert sorted(os.listdir(again.local)) == ["metrics.jsonl"]
    again.close()


def _clock_moved_on(seconds):
    """A ``datetime`` whose ``now()`` is ``seconds`` late: every lock object looks that much older."""
    real = datetime

    class Later(real):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + timedelta(seconds=seconds)

    return Later


def test_object_lock_refuses_a_live_owner_and_takes_over_a_silent_or_dead_one(gcs_bucket, monkeypatch):
    directory = gcs_bucket + "/run"
    first = runlock.ObjectLock(directory, heartbeat_s=3600)  # heartbeats called by hand below
    first.acquire()
    assert first.heartbeat()  # still its own: rewritten under its generation
    second = runlock.ObjectLock(directory, heartbeat_s=3600)
    with pytest.raises(runlock.RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        second.acquire()
    # Silent for longer than STALE_AFTER_S (the clock moved on): taken over, and the old owner learns it.
    monkeypatch.setattr(runlock, "datetime", _clock_moved_on(runlock.STALE_AFTER_S + 1))
    second.acquire()
    assert second.took_over["pid"] == os.getpid()
    assert not first.heartbeat()
    with pytest.raises(runlock.RunLockedError, match="took over"):
        runlock.check_held([first])
    first.release()  # lost: leaves the new owner's lock alone
    assert storage.exists(directory + "/" + runlock.LOCK_NAME)
    second.release()
    assert not storage.exists(directory + "/" + runlock.LOCK_NAME)
    monkeypatch.setattr(runlock, "datetime", datetime)
    # A lock naming a process of this host that is gone (a run killed with kill -9): taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.write_text(
        directory + "/" + runlock.LOCK_NAME, f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": "x"}}'
    )
    third = runlock.ObjectLock(directory, heartbeat_s=3600)
    third.acquire()
    assert third.took_over["pid"] == dead.pid
    third.release()


def test_bad_url_exits_2_before_the_model_loads(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "alpha beta"}\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "train", "finetune", "model.source=preset:tiny", f"data.train_files=[{data}]"]
        + ["output.dir=s3://bucket/run", "steps=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    print(f"s3:// output.dir: rc {proc.returncode} in {seconds:.1f}s")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "output.dir='s3://bucket/run': s3:// is not supported" in proc.stderr
    assert "model " not in proc.stdout  # no start summary: nothing was loaded
    assert os.listdir(tmp_path) == ["train.jsonl"]  # no "s3:" folder, no runs/


def test_data_urls_that_cannot_work_are_refused_before_anything_loads(gcs_bucket):
    from train.finetune import _check_locations

    for key, message in (
        ("data.train_files=[s3://b/train.jsonl]", "data.train_files='s3://b/train.jsonl': s3:// is not supported"),
        (f"data.train_files=[{gcs_bucket}/missing.jsonl]", f"data.train_files: {gcs_bucket}/missing.jsonl does not"),
        ("data.validation_files=[gs://no-such-bucket-x/v.jsonl]", "bucket no-such-bucket-x does not exist"),
        ("data.cache_dir=gs://no-such-bucket-x/tokens", "data.cache_dir='gs://no-such-bucket-x/tokens': bucket"),
    ):
        cfg = resolve(load_config(None, ["model.source=preset:tiny", "output.dir=/tmp/x", key]))
        with pytest.raises(storage.StorageError, match=re.escape(message)):
            _check_locations(cfg)


def _put(url, data: bytes):
    with storage.path(url).open("wb") as f:
        f.write(data)


def test_local_copy_downloads_once_and_again_when_the_object_changes(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_copies", {})  # the per-process memo: each call below must look at the bucket
    _put(f"{gcs_bucket}/d/train.jsonl", b'{"text": "one"}\n')
    _put(f"{gcs_bucket}/ds/data-00000-of-00001.arrow", b"A" * 10)
    _put(f"{gcs_bucket}/ds/sub/state.json", b"{}")
    first = storage.local_copy(f"{gcs_bucket}/d/train.jsonl", str(tmp_path))
    assert os.path.basename(first) == "train.jsonl" and Path(first).read_bytes() == b'{"text": "one"}\n'
    mtime = os.stat(first).st_mtime_ns
    storage._copies.clear()
    assert storage.local_copy(f"{gcs_bucket}/d/train.jsonl", str(tmp_path)) == first
    assert os.stat(first).st_mtime_ns == mtime  # unchanged object: not downloaded again
    _put(f"{gcs_bucket}/d/train.jsonl", b'{"text": "two"}\n')  # same size, new generation
    storage._copies.clear()
    assert Path(storage.local_copy(f"{gcs_bucket}/d/train.jsonl", str(tmp_path))).read_bytes() == b'{"text": "two"}\n'
    folder = storage.local_copy(f"{gcs_bucket}/ds", str(tmp_path))
    assert sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) == [
        "data-00000-of-00001.arrow",
        os.path.join("sub", "state.json"),
    ]
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.local_copy(f"{gcs_bucket}/nothing-here.jsonl", str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) for m in os.listdir(tmp_path / n) if m.startswith(".download-")]


class _CountingBytes(models.ByteTokenizer):
    texts = 0

    def encode_batch(self, texts, add_bos=False):
        type(self).texts += len(texts)
        return super().encode_batch(texts, add_bos=add_bos)


def test_token_cache_on_gs_is_built_once_and_downloaded_by_another_host(gcs_bucket, tmp_path, monkeypatch):
    """A gs:// data file and a gs:// cache: the first host tokenizes and uploads the entry; a second host (its own
    local cache and downloads) maps the same rows without tokenizing; a changed data object is a new key."""
    from train import data as data_lib
    from train.config import DataConfig

    monkeypatch.setattr(storage, "_copies", {})
    lines = "".join(f'{{"text": "document {i} about finches"}}\n' for i in range(40)).encode()
    _put(f"{gcs_bucket}/data/train.jsonl", lines)
    cache, cfg = f"{gcs_bucket}/tokens", DataConfig(seq_len=24)

    def host(name):
        monkeypatch.setenv("FINCH_TOKEN_CACHE", str(tmp_path / name / "tokens"))
        monkeypatch.setenv("FINCH_DOWNLOADS", str(tmp_path / name / "downloads"))
        storage._copies.clear()
        _CountingBytes.texts = 0
        return data_lib.load_split(_CountingBytes(), cfg, [f"{gcs_bucket}/data/train.jsonl"], cache_dir=cache)

    built = host("a")
    assert not built.cache.hit and _CountingBytes.texts > 0
    assert [src.name for src in built.sources] == [f"{gcs_bucket}/data/train.jsonl"]  # the URL, not the local copy
    assert built.cache.remote.startswith(cache + "/train-") and built.cache.path.startswith(str(tmp_path / "a"))
    assert storage.exists(built.cache.remote + "/meta.json") and storage.exists(built.cache.remote + "/tokens.bin")
    found = host("b")
    assert found.cache.hit and _CountingBytes.texts == 0 and found.cache.remote == built.cache.remote
    assert found.cache.path.startswith(str(tmp_path / "b"))
    local_file = storage.local_copy(f"{gcs_bucket}/data/train.jsonl", str(tmp_path / "c"))
    local = data_lib.load_split(models.ByteTokenizer(), cfg, [local_file])  # in memory, no cache
    for f in ("tokens", "targets", "loss_mask", "segment_ids"):
        np.testing.assert_array_equal(getattr(found.rows.materialize(), f), getattr(local.rows, f), err_msg=f)
    _put(f"{gcs_bucket}/data/train.jsonl", lines + b'{"text": "one more"}\n')
    changed = host("b")
    assert not changed.cache.hit and changed.cache.remote != built.cache.remote


def test_save_clock_is_due_every_period_after_the_last_save():
    from train.checkpoint import SaveClock

    now = [0.0]
    clock = SaveClock(10, clock=lambda: now[0])
    now[0] = 599.0
    assert not clock.due(1)
    now[0] = 600.0
    assert clock.due(2)
    clock.saved()  # any save (by steps, at an evaluation) restarts the period
    now[0] = 1199.0
    assert not clock.due(3)
    assert not SaveClock(0, clock=lambda: 1e9).due(4)  # 0: off


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_negative_or_nan_every_minutes_is_a_config_error(value):
    from train.config import ConfigError, check_ranges

    with pytest.raises(ConfigError, match="checkpoint.every_minutes must be >= 0"):
        check_ranges(load_config(None, [f"checkpoint.every_minutes={value}"]))


@pytest.mark.slow
def test_a_run_saves_by_wall_time_without_a_step_cadence(tmp_path):
    from test_train_resume import _overrides, _train

    from train.checkpoint import Checkpointer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "{i}: alpha beta gamma delta"}}\n' for i in range(48)))
    # every=0 (no step cadence) and a period far shorter than a step: every step is saved.
    extra = ["checkpoint.every_minutes=0.00001", "checkpoint.keep=0", "steps=3"]
    rc, out, err = _train(_overrides(data, tmp_path, every=0, extra=extra))
    assert rc == 0, err[-3000:]
    assert "every 1e-05 min of training and at the end, keep 0; a crash loses at most ~1e-05 min" in out
    assert Checkpointer(str(tmp_path / "ckpt"), create=False).all_steps() == [1, 2, 3]


def test_quarantine_moves_a_gs_step_aside(gcs_bucket):
    from train.checkpoint import Checkpointer

    directory = gcs_bucket + "/ckpt"
    storage.write_text(directory + "/5/state/data", "x")
    storage.write_text(directory + "/corrupt-5/state/data", "an earlier one")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        assert checkpointer.directory == directory  # not made a local path
        assert checkpointer.quarantine(5) == directory + "/corrupt-5.1"
    finally:
        checkpointer.close()
    assert storage.read_text(directory + "/corrupt-5.1/state/data") == "x"
    assert not storage.exists(directory + "/5/state/data")


def test_generate_and_chat_read_a_hugging_face_export_in_a_bucket(gcs_bucket, tmp_path, capsys):
    """`finch-train generate --model gs://.../hf`: the export is downloaded once and decodes as the local one does; a
    bucket folder that is no export is refused with one line, before any model loads."""
    from train import cli, export, generate

    model, tokenizer = models.load("preset:tiny")
    local = export.export_hf(model, tokenizer, tmp_path / "hf")
    fs = storage._gcs_filesystem()
    fs.put(str(local), f"{gcs_bucket.removeprefix('gs://')}/run/hf", recursive=True)
    args = ["generate", "--prompt", "river", "--max-new-tokens", "6"]
    assert cli.main([*args, "--model", str(local)]) == 0
    want = capsys.readouterr().out
    assert cli.main([*args, "--model", f"{gcs_bucket}/run/hf"]) == 0
    assert capsys.readouterr().out == want
    assert generate.model_context(f"{gcs_bucket}/run/hf") == model.config.max_position_embeddings
    assert cli.main([*args, "--model", f"{gcs_bucket}/run"]) == 2
    assert "holds no config.json or adapter_config.json" in capsys.readouterr().err
