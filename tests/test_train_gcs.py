"""A fine-tuning run whose run folder and checkpoints are ``gs://`` URLs, on a local GCS emulator (no network).

One test, in the order a user meets it: a second writer is refused (exit 2), a run is killed with SIGKILL mid-run,
the same command resumes it from the bucket and ends bit for bit where an uninterrupted local run ends, its export
in the bucket is sharded and transformers loads it, a corrupted checkpoint object is refused (exit 2), and nothing
is left on the local disk (the staging folder is deleted).
"""

import os
import signal

import numpy as np
import pytest
from test_train_resume import (
    ROOT,
    STEPS,
    _assert_states_equal,
    _metrics,
    _overrides,
    _saved_state,
    _steps_done,
    _train,
    data_file,  # noqa: F401  (a fixture)
)

from train import runlock, storage


def _saved_state_at(directory, step):
    """Every array of checkpoint ``step`` under ``directory`` (a URL) as host NumPy, keyed by path."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    path = f"{directory}/{step}/state"
    layout = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), layout)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _gcs_metrics(run):
    import json

    lines = storage.read_text(f"{run}/metrics.jsonl").splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _error_lines(err):
    return [line for line in err.splitlines() if line.strip() and "WARNING" not in line and line[:1] not in "IW"]


def _assert_transformers_loads_the_sharded_export(url, tmp_path):
    """The export in the bucket is in shards with an index, and transformers loads it (from a downloaded copy) with
    the logits of our own loader."""
    import json

    import torch
    import transformers

    import models

    local = storage.local_copy(url, str(tmp_path / "downloads"))
    index = json.loads(open(os.path.join(local, "model.safetensors.index.json")).read())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.exists(os.path.join(local, n)) for n in shards)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    ours, _ = models.load(f"hf:{local}", dtype="float32")
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), theirs, atol=1e-4)


@pytest.mark.slow
def test_gs_run_folder_and_checkpoints_survive_sigkill_refuse_a_second_writer_and_corruption(
    data_file,  # noqa: F811
    gcs_bucket,
    tmp_path,
):
    straight = tmp_path / "straight"
    rc, _, err = _train(_overrides(data_file, straight, every=2))
    assert rc == 0, err[-3000:]

    run = f"{gcs_bucket}/run"
    overrides = _overrides(data_file, run, every=2, extra=["output.hf_export=true", "output.hf_shard_size=100KB"])
    staging = storage.StagedFolder(run).local

    # A live owner (this test process) holds the run folder: the CLI is refused before anything loads.
    owner = runlock.ObjectLock(run)
    owner.acquire()
    try:
        rc, out, err = _train(overrides, cli=True)
    finally:
        owner.release()
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and f"{run} is in use by another run (pid {os.getpid()}" in lines[0], err[-2000:]
    assert "model " not in out

    # SIGKILL at step 3 (checkpoint 2 is in the bucket: the worker waits 2 s after each step, so its asynchronous
    # upload is done): the staging folder is all that stays on the local disk.
    rc, out, err = _train(overrides, kill_after_save=3, sleep=2.0)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert _steps_done(out) == [1, 2, 3]
    assert storage.exists(f"{run}/ckpt/2/commit_success.txt") and not storage.exists(f"{run}/ckpt/4")
    assert os.path.isdir(staging)

    # The same command resumes from the bucket (taking over the dead run's lock) and ends bit for bit the same.
    rc, out, err = _train(overrides)
    assert rc == 0, err[-3000:]
    assert "took over the stale lock" in out
    assert _steps_done(out) == list(range(3, STEPS + 1))
    _assert_states_equal(_saved_state(straight, STEPS), _saved_state_at(f"{run}/ckpt", STEPS))
    resumed, want = _gcs_metrics(run), _metrics(straight)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "every step logged once"
    for step in want:
        assert resumed[step]["loss"] == want[step]["loss"], step
    for name in ("config.yaml", "summary.json", "hf/model.safetensors.index.json", "hf/config.json"):
        assert storage.exists(f"{run}/{name}"), name
    _assert_transformers_loads_the_sharded_export(f"{run}/hf", tmp_path)
    assert not storage.exists(f"{run}/{runlock.LOCK_NAME}")  # released
    assert not os.path.exists(staging), "the staging folder is deleted at the end"
    assert not (ROOT / "gs:").exists()

    # A flipped byte range in the newest checkpoint's biggest object: refused, exit 2, one line.
    fs = storage._gcs_filesystem()
    objects = fs.find(f"{run}/ckpt/{STEPS}/state".removeprefix("gs://"), detail=True)
    victim = max(objects, key=lambda k: objects[k]["size"])
    data = bytearray(fs.cat_file(victim))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    fs.pipe_file(victim, bytes(data))
    rc, _, err = _train(overrides, cli=True)
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and f"{run}/ckpt/{STEPS}" in lines[0] and "corrupt" in lines[0], err[-2000:]
    assert not os.path.exists(staging)


@pytest.mark.slow
def test_two_processes_write_one_gs_run_folder_and_agree_on_time_saves(data_file, gcs_bucket, tmp_path):  # noqa: F811
    """2 processes × 4 CPU devices (gloo), each with its own local disk, data and token cache in the bucket:
    process 0 alone reads the data, builds the token cache entry and uploads it, and the other downloads the entry
    (never the data); process 0 alone holds the lock and writes the run folder; both join the orbax saves,
    including the one due by wall time (decided on process 0's clock, agreed every 8 steps)."""
    import subprocess
    import sys

    from test_train_resume import _env, _free_port

    from train.checkpoint import Checkpointer, SaveClock

    run = f"{gcs_bucket}/multi"
    with open(data_file, "rb") as f, storage.path(f"{gcs_bucket}/data/train.jsonl").open("wb") as g:
        g.write(f.read())
    steps = SaveClock.AGREE_EVERY + 1
    extra = ["mesh.data=-1", "mesh.fsdp=1", f"steps={steps}", "checkpoint.every_minutes=0.00001", "checkpoint.keep=0"]
    extra.append(f"data.cache_dir={gcs_bucket}/tokens")
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "train", "finetune", "--coordinator", f"127.0.0.1:{port}"]
        cmd += ["--num-processes", "2", "--process-id", str(pid)]
        cmd += _overrides(f"{gcs_bucket}/data/train.jsonl", run, every=0, extra=extra)
        host = {"FINCH_TOKEN_CACHE": str(tmp_path / f"host{pid}" / "tokens")}
        host["FINCH_DOWNLOADS"] = str(tmp_path / f"host{pid}" / "downloads")
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env={**_env(4), **host}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "checkpoints" in outs[0][0] and "done " in outs[0][0]
    assert f"token cache {gcs_bucket}/tokens/train-" in outs[0][0] and "built in" in outs[0][0]
    assert os.listdir(tmp_path / "host0" / "downloads")  # process 0 read the data from its local copy
    assert not (tmp_path / "host1" / "downloads").exists()  # process 1 never read it ...
    (mirror,) = os.listdir(tmp_path / "host1" / "tokens")  # ... and mapped the entry it downloaded
    assert [n for n in os.listdir(tmp_path / "host1" / "tokens" / mirror) if n.startswith("train-")]
    assert "done " not in outs[1][0], "only process 0 prints and writes the summaries"
    assert sorted(_gcs_metrics(run)) == list(range(1, steps + 1))
    checkpointer = Checkpointer(f"{run}/ckpt", create=False)
    try:
        # every=0: only the wall-time save at step 8 (the first agreement point) and the one at the end
        assert checkpointer.all_steps() == [SaveClock.AGREE_EVERY, steps]
    finally:
        checkpointer.close()
    assert not storage.exists(f"{run}/{runlock.LOCK_NAME}")
    assert not os.path.exists(storage.StagedFolder(run).local)
