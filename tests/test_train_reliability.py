"""Reliability: a diverging, preempted, misconfigured or doubled run never loses the good state it had.

Each test is a real fault on the tiny model in its own process (the helpers of test_train_resume.py start them):
a learning rate that makes every gradient NaN, a byte-flipped checkpoint, a read-only / full / impossible
checkpoint directory, a second run on a busy folder, a changed setting on resume, and a real SIGTERM. The fast
in-process tests below them pin the pieces (skip guard per optimizer, checksums across shardings, lock, ranges).
"""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_resume import (
    STEPS,
    _assert_states_equal,
    _launch,
    _metrics,
    _overrides,
    _saved_state,
    _steps_done,
    _train,
    data_file,  # noqa: F401  (a fixture)
)

from train import config as config_lib
from train import mesh as mesh_lib
from train import resume as resume_lib
from train import runlock
from train.checkpoint import Checkpointer, state_digest
from train.config import ConfigError, load_config
from train.optimizers import OPTIMIZERS, make_optimizer
from train.step import TrainState


def _ckpt(run_dir):
    return Checkpointer(str(Path(run_dir) / "ckpt"), create=False)


def _snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _error_lines(err):
    """The lines of stderr that are not warnings (the CLI's error is one of them)."""
    return [line for line in err.splitlines() if line.strip() and "WARNING" not in line]


@pytest.mark.slow
def test_nan_run_stops_nonzero_and_keeps_a_finite_last_good_checkpoint(data_file, tmp_path):  # noqa: F811
    # The repro: lr 1e6 makes the gradients NaN from the third step on; keep=2 would rotate good ones away.
    extra = [
        "steps=30",
        "checkpoint.keep=2",
        "optimizer.max_learning_rate=1e6",
        "optimizer.base_learning_rate=1e6",
        "guard.max_consecutive_skips=5",
    ]
    t0 = time.perf_counter()
    rc, out, err = _train(_overrides(data_file, tmp_path, every=2, extra=extra), cli=True)
    assert rc == 3, err[-3000:]
    assert "training diverged" in err and "stopped at step" in err, err[-2000:]
    records = list(_metrics(tmp_path).values())
    worst = max(r["consecutive_skips"] for r in records)
    assert worst == 5 and records[-1]["skipped"] >= 5
    stop = records[-1]["step"]
    assert f"stopped at step {stop}" in err
    assert stop < 30, "it stopped early"
    steps = _ckpt(tmp_path).all_steps()
    assert steps, "a checkpoint survived"
    for step in steps:
        state = _saved_state(tmp_path, step)
        bad = [k for k, v in state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        assert not bad, (step, bad[:3])
    print(f"NaN run: rc {rc} after {time.perf_counter() - t0:.1f}s, stopped at step {stop}, checkpoints {steps}")


@pytest.mark.slow
def test_byte_flipped_checkpoint_is_refused_untouched_or_skipped_with_on_corrupt_previous(data_file, tmp_path):  # noqa: F811
    overrides = _overrides(data_file, tmp_path, every=2, extra=["steps=4"])
    rc, _, err = _train(overrides)
    assert rc == 0, err[-3000:]
    files = sorted((tmp_path / "ckpt" / "4" / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    victim = files[-1]
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    victim.write_bytes(bytes(data))
    before = _snapshot(tmp_path / "ckpt")

    t0 = time.perf_counter()
    rc, _, err = _train(_overrides(data_file, tmp_path, every=2), cli=True)
    print(f"byte-flipped checkpoint: rc {rc} in {time.perf_counter() - t0:.1f}s")
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "/ckpt/4" in lines[0] and "corrupt" in lines[0], err[-2000:]
    assert _snapshot(tmp_path / "ckpt") == before, "a failed restore must not change the checkpoint directory"

    rc, out, err = _train(_overrides(data_file, tmp_path, every=2, extra=["checkpoint.on_corrupt=previous"]))
    assert rc == 0, err[-3000:]
    assert _steps_done(out) == list(range(3, STEPS + 1)), out  # resumed from step 2
    assert (tmp_path / "ckpt" / "corrupt-4").is_dir()
    assert _ckpt(tmp_path).latest_step() == STEPS


@pytest.mark.slow
def test_unwritable_or_full_checkpoint_directory_exits_within_seconds(data_file, tmp_path):  # noqa: F811
    # 1) A path that cannot be a directory (under a regular file): refused before the model loads.
    (tmp_path / "file").write_text("not a directory")
    t0 = time.perf_counter()
    rc, _, err = _train(
        _overrides(data_file, tmp_path / "run", every=2, extra=[f"checkpoint.directory={tmp_path}/file/ckpt"]), cli=True
    )
    seconds = time.perf_counter() - t0
    assert rc == 2 and "cannot write to" in err, err[-2000:]
    assert len(_error_lines(err)) == 1
    print(f"checkpoint directory under a file: rc {rc} in {seconds:.1f}s")
    mount = tmp_path / "mnt"
    mount.mkdir()
    # 2) A read-only filesystem, and 3) a full one, need a real mount (root with CAP_SYS_ADMIN, as in CI here).
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip(reason="cannot mount a tmpfs here; the read-only and disk-full cases need one")
    try:
        (mount / "ro").mkdir()
        (mount / "ro" / "ckpt").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        t0 = time.perf_counter()
        rc, _, err = _train(_overrides(data_file, mount / "ro", every=2), cli=True)
        seconds = time.perf_counter() - t0
        assert rc == 2 and "Read-only file system" in err, err[-2000:]
        assert len(_error_lines(err)) == 1
        print(f"read-only checkpoint directory: rc {rc} in {seconds:.1f}s")
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        # A checkpoint of the tiny model takes ~1.5 MB: on a 1 MB filesystem the background save of step 2 fails.
        subprocess.run(["umount", str(mount)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
        t0 = time.perf_counter()
        rc, out, err = _train(_overrides(data_file, mount / "full", every=2), cli=True)
        seconds = time.perf_counter() - t0
        assert rc == 2, err[-3000:]
        lines = _error_lines(err)
        assert len(lines) == 1 and "ckpt/2: save failed: no space left on the device" in lines[0], err[-3000:]
        assert _ckpt(mount / "full").latest_step() is None
        print(f"disk full: rc {rc} in {seconds:.1f}s")
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
def test_checkpoint_directory_made_unwritable_mid_run_stops_the_run_within_a_step(data_file, tmp_path):  # noqa: F811
    proc = _launch(_overrides(data_file, tmp_path, every=2), sleep=1.0)
    ckpt = tmp_path / "ckpt"
    try:
        for line in proc.stdout:
            if line.strip() == "step 3":
                break
        # Immutable: not even root can add the next step's directory (chattr needs ext2/3/4, xfs, btrfs...).
        if subprocess.run(["chattr", "+i", str(ckpt)], capture_output=True).returncode:
            pytest.skip(reason="chattr +i does not work on this filesystem")
        t0 = time.perf_counter()
        out, err = proc.communicate(timeout=300)
        print(
            f"checkpoint directory made immutable after step 3: exit {proc.returncode} in {time.perf_counter() - t0:.1f}s"
        )
    finally:
        subprocess.run(["chattr", "-i", str(ckpt)])
        proc.kill()
    assert proc.returncode != 0
    assert f"CheckpointSaveError: checkpoint {ckpt}/4: save failed: PermissionError" in err, err[-3000:]
    assert _steps_done(out) == []  # the save of step 4 failed before the worker reported step 4
    assert _ckpt(tmp_path).all_steps() == [2]


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_owner(data_file, tmp_path):  # noqa: F811
    first = _launch(_overrides(data_file, tmp_path, every=2), sleep=2.0)
    try:
        for line in first.stdout:
            if line.strip() == "step 1":
                break
        t0 = time.perf_counter()
        rc, _, err = _train(_overrides(data_file, tmp_path, every=2), cli=True)
        print(f"second writer: rc {rc} in {time.perf_counter() - t0:.1f}s")
        assert rc == 2, err[-3000:]
        lines = _error_lines(err)
        assert len(lines) == 1 and f"in use by another run (pid {first.pid}" in lines[0], err[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The owner died without releasing: its lock is stale, and the next run takes it over.
    rc, out, err = _train(_overrides(data_file, tmp_path, every=2))
    assert rc == 0, err[-3000:]


@pytest.mark.slow
def test_changed_lr_or_data_on_resume_is_refused_with_a_diff_unless_accepted(data_file, tmp_path):  # noqa: F811
    rc, _, err = _train(_overrides(data_file, tmp_path, every=2, extra=["steps=2"]), cli=True)
    assert rc == 0, err[-3000:]
    changed = ["optimizer.max_learning_rate=1e-3"]
    t0 = time.perf_counter()
    rc, _, err = _train(_overrides(data_file, tmp_path, every=2, extra=["steps=4", *changed]), cli=True)
    print(f"changed lr on resume: rc {rc} in {time.perf_counter() - t0:.1f}s")
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and "optimizer.max_learning_rate: 0.003 -> 0.001" in lines[0], err[-2000:]
    # The same row count, other content: one word changed.
    edited = tmp_path / "edited.jsonl"
    edited.write_text(Path(data_file).read_text().replace("alpha", "omega", 1))
    rc, _, err = _train(_overrides(edited, tmp_path, every=2, extra=["steps=4"]), cli=True)
    assert rc == 2 and "data (content of the packed training rows)" in err, err[-2000:]

    accept = ["steps=4", *changed, "checkpoint.accept_config_change=true"]
    rc, out, err = _train(_overrides(data_file, tmp_path, every=2, extra=accept), cli=True)
    assert rc == 0, err[-3000:]
    assert "optimizer.max_learning_rate: 0.003 -> 0.001" in out
    old = load_config(tmp_path / "config.before-step2.yaml")
    new = load_config(tmp_path / "config.yaml")
    assert (old.optimizer.max_learning_rate, new.optimizer.max_learning_rate) == (3e-3, 1e-3)
    assert sorted(_metrics(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_resume_is_bitwise_exact(data_file, tmp_path_factory):  # noqa: F811
    straight_dir = tmp_path_factory.mktemp("straight")
    rc, _, err = _train(_overrides(data_file, straight_dir, every=STEPS // 2))
    assert rc == 0, err[-3000:]
    run_dir = tmp_path_factory.mktemp("sigterm")
    overrides = _overrides(data_file, run_dir, every=STEPS // 2)
    proc = _launch(overrides, sleep=1.0)
    for line in proc.stdout:
        if line.strip() == "step 2":
            proc.send_signal(signal.SIGTERM)
            break
    t0 = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    print(f"SIGTERM: exit {proc.returncode} {time.perf_counter() - t0:.1f}s after the signal")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM after step 2" in err
    assert _ckpt(run_dir).all_steps() == [2]
    rc, out, err = _train(overrides)
    assert rc == 0, err[-3000:]
    assert _steps_done(out) == list(range(3, STEPS + 1))
    _assert_states_equal(_saved_state(straight_dir, STEPS), _saved_state(run_dir, STEPS))
    straight, resumed = _metrics(straight_dir), _metrics(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "no step logged twice"
    for step in range(1, STEPS + 1):
        assert resumed[step]["loss"] == straight[step]["loss"], step


# --------------------------------------------------------------------------------------------------------------------
# in-process pieces


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_skips_a_nonfinite_step_whole(name):
    cfg = load_config(None, [f"optimizer.name={name}", "optimizer.clip_norm=1.0"])
    tx = make_optimizer(cfg.optimizer, total_steps=10)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params, value=jnp.float32(2.0))
    for bad_grads, loss in ((jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads), 2.0), (grads, jnp.inf)):
        updates, new_state = tx.update(bad_grads, state, params, value=jnp.float32(loss))
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
        inner = lambda s: s.inner_state  # noqa: E731
        for a, b in zip(jax.tree.leaves(inner(new_state)), jax.tree.leaves(inner(state))):
            np.testing.assert_array_equal(a, b)
        state = new_state
    assert (int(state.skipped), int(state.consecutive_skips)) == (2, 2)


def test_checksums_are_sharding_independent_and_catch_one_flipped_bit():
    mesh_a = jax.make_mesh((8,), ("x",))
    mesh_b = jax.make_mesh((2, 4), ("x", "y"))
    w = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
    shard = lambda mesh, spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731

    def state(x):
        return TrainState(jnp.int32(3), {"w": x, "h": x.astype(jnp.bfloat16)}, (), None, jnp.zeros(2, jnp.uint32))

    finite_a, sums_a = state_digest(state(jax.device_put(w, shard(mesh_a, ("x",)))))
    finite_b, sums_b = state_digest(state(jax.device_put(w, shard(mesh_b, ("y", "x")))))
    assert finite_a and finite_b and sums_a == sums_b
    flipped = np.asarray(w).copy()
    flipped.view(np.uint32)[17, 3] ^= 1 << 9
    _, sums_c = state_digest(state(jnp.asarray(flipped)))
    assert sums_c["params/w"] != sums_a["params/w"]
    swapped = np.asarray(w)[::-1].copy()  # same values, other places
    assert state_digest(state(jnp.asarray(swapped)))[1]["params/w"] != sums_a["params/w"]
    assert not state_digest(state(w.at[1, 1].set(jnp.inf)))[0]


def test_run_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    first = runlock.RunLock(str(tmp_path / "run"))
    first.acquire()
    with pytest.raises(runlock.RunLockedError, match=f"pid {os.getpid()} on host"):
        runlock.RunLock(str(tmp_path / "run")).acquire()
    first.release()
    # A lock file naming a process that is gone (written as a killed run leaves it, with no flock held).
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run" / runlock.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "t"}))
    second = runlock.RunLock(str(tmp_path / "run"))
    second.acquire()
    assert second.took_over["pid"] == dead.pid
    second.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runlock.UnwritableDirectoryError, match="cannot write to"):
        runlock.RunLock(str(tmp_path / "file" / "run")).acquire()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dtype=float16", "fp16 training needs loss scaling"),
        ("optimizer.b1=1.0", r"optimizer.b1 must be in \[0, 1\)"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be in"),
        ("optimizer.eps=-1e-8", "optimizer.eps must be in"),
        ("optimizer.max_learning_rate=.inf", "learning_rate must be > 0 and finite"),
        ("optimizer.ema_decay=0.5", "ema_decay=0.5 is a FINCH setting"),
        ("checkpoint.on_corrupt=ignore", "checkpoint.on_corrupt must be one of"),
        ("output.hf_shard_size=5TBB", "output.hf_shard_size='5TBB' is not a size"),
        ("output.hf_shard_size=0GB", "output.hf_shard_size='0GB' is not a size"),
        ("guard.max_consecutive_skips=-1", "guard.max_consecutive_skips must be >= 0"),
        ("data.seq_len=0", "data.seq_len must be >= 1"),
        ("mesh.rules=[mpl=tensor]", "unknown logical axis 'mpl'"),
    ],
)
def test_out_of_range_settings_are_config_errors(override, message):
    overrides = [override] + (["optimizer.name=adamw"] if "ema_decay" in override else [])
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        config_lib.check_ranges(cfg)
        make_optimizer(cfg.optimizer, total_steps=10)
        mesh_lib.parse_rules(cfg.mesh.rules)


def test_config_diff_ignores_where_and_how_long_but_not_what():
    old = config_lib.to_dict(load_config(None, ["steps=10", "optimizer.max_learning_rate=1e-3"]))
    same = config_lib.to_dict(
        load_config(
            None, ["steps=20", "optimizer.max_learning_rate=1e-3", "mesh.data=2", "output.dir=/x", "progress=false"]
        )
    )
    assert resume_lib.config_diff(old, same) == []
    other = config_lib.to_dict(
        load_config(None, ["steps=10", "optimizer.max_learning_rate=2e-3", "data.seed=1", "seed=3"])
    )
    assert [k for k, _, _ in resume_lib.config_diff(old, other)] == ["data.seed", "optimizer.max_learning_rate", "seed"]


def test_trim_metrics_drops_the_steps_a_dead_run_logged_past_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert resume_lib.trim_metrics(str(tmp_path), 2) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_eval_refuses_rows_longer_than_the_model_context(capsys):
    from train.lab import evaluate

    argv = ["--model", "preset:tiny", "--task", "none", "--retain", "none", "--quiz-items", "0", "--seq-len", "100000"]
    assert evaluate.main(argv) == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_nan_weights_are_refused_before_the_first_step():
    from train.guard import NonFiniteWeightsError, check_finite_params

    params = {"layers": {"0": {"w": jnp.ones((2, 3)).at[1, 2].set(jnp.nan)}}, "embed": jnp.ones(4)}
    with pytest.raises(NonFiniteWeightsError, match="'layers/0/w' holds NaN or inf"):
        check_finite_params(params, "hf:broken")
    check_finite_params({"embed": jnp.ones(4)}, "hf:fine")
