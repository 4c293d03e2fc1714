"""Exact resume in a fresh process (two meshes), SIGKILL mid-run and during an async save, and a 2-process run.

Every training run here is a separate Python process on 8 simulated CPU devices (the 2-process run: 4 each), like a
real job that dies and is restarted. This file doubles as the worker script: ``python tests/test_train_resume.py
[--kill-after-save N] [--sleep S] key=value...`` runs :func:`train.finetune.run` with hooks the tests need.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _worker(argv):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-save", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints every thread's stack if stuck
    from train.config import load_config
    from train.finetune import run
    from train.preemption import EXIT_CODE, Preempted

    def on_step(step, state):
        print(f"step {step}", flush=True)
        if step == args.kill_after_save:
            # run() has just started the asynchronous save of this step: die before it can finish.
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.sleep)

    try:
        run(load_config(None, args.overrides), on_step=on_step)
    except Preempted as e:  # SIGTERM: run() saved a checkpoint first; exit as `finch-train finetune` does
        print(e, file=sys.stderr)
        sys.exit(EXIT_CODE)


def other_xla_flags() -> str:
    """This process's XLA_FLAGS (conftest's) without the device count, for subprocesses that set their own."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))


def _env(devices=8):
    # No JAX persistent compilation cache here: resumed processes that loaded cached executables hung in an
    # in-process all-reduce in 3 of ~9 tries while developing (never in ~10 tries without it), so each run compiles.
    env = dict(os.environ)
    # A starved 2-core CI box can leave one simulated device's thread unscheduled for a while: give the in-process
    # all-reduce rendezvous minutes, not XLA's default 40 s, before it aborts the process.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_call_terminate_timeout_seconds=600 "
        + other_xla_flags()
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _overrides(data_file, run_dir, every, extra=()):
    return [
        f"data.train_files=[{data_file}]",
        "data.seq_len=32",
        "data.batch_size=16",
        "data.grad_accum=2",
        f"steps={STEPS}",
        "optimizer.max_learning_rate=3e-3",
        "optimizer.base_learning_rate=3e-3",
        f"output.dir={run_dir}",
        "output.hf_export=false",
        f"checkpoint.directory={run_dir}/ckpt",
        f"checkpoint.every={every}",
        "progress=false",
        "tensorboard=false",
        *extra,
    ]


def _launch(overrides, *, kill_after_save=None, sleep=0.0, devices=8, cli=False):
    """Starts a training process: this file's worker (with its hooks), or with ``cli`` the real ``finetune`` CLI."""
    cmd = [sys.executable, __file__, f"--sleep={sleep}"]
    if kill_after_save is not None:
        cmd.append(f"--kill-after-save={kill_after_save}")
    if cli:
        cmd = [sys.executable, "-m", "train", "finetune"]
    return subprocess.Popen(
        cmd + ["--", *overrides], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _train(overrides, **kw):
    proc = _launch(overrides, **kw)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _steps_done(out):
    """The steps the worker reported (its ``step N`` lines; the run's summaries go to stdout too)."""
    return [int(line.split()[1]) for line in out.splitlines() if re.fullmatch(r"step \d+", line.strip())]


def _metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _saved_state(run_dir, step):
    """Every array of a saved state as host NumPy, keyed by path (read back without any target)."""
    import jax
    import orbax.checkpoint as ocp

    path = str(Path(run_dir) / "ckpt" / str(step) / "state")
    checkpointer = ocp.PyTreeCheckpointer()
    # As NumPy: the saving processes' devices (e.g. another process's ids) need not exist here.
    layout = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), layout)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(48):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "finch", "optax"], rng.integers(2, 5)))
            obj = {"text": f"{i}: {words}."} if i % 2 else {"prompt": f"Q{i}:", "completion": f" {words}."}
            f.write(json.dumps(obj) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, data_file):
    """Uninterrupted 2N-step runs (checkpoints at N and 2N) on the default mesh (data=8) and on (2, 2, 2)."""
    runs = {}
    for name, mesh in (
        ("data8", ["mesh.data=-1", "mesh.fsdp=1"]),
        ("d2f2t2", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    ):
        run_dir = tmp_path_factory.mktemp(f"straight_{name}")
        rc, out, err = _train(_overrides(data_file, run_dir, every=STEPS // 2, extra=mesh))
        assert rc == 0, err[-3000:]
        runs[name] = (run_dir, mesh)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data8", "d2f2t2"])
def test_resume_in_a_fresh_process_is_bitwise_exact(straight_runs, data_file, tmp_path, name):
    straight_dir, mesh = straight_runs[name]
    # The state after N steps, exactly as the straight run saved it; a new process continues from there.
    shutil.copytree(Path(straight_dir) / "ckpt", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / str(STEPS))
    rc, out, err = _train(_overrides(data_file, tmp_path, every=STEPS // 2, extra=mesh))
    assert rc == 0, err[-3000:]
    assert re.search(r"token cache \S+ \(found, built", out), out  # the rows the straight run tokenized, mapped
    resumed, straight = _metrics(tmp_path), _metrics(straight_dir)
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))  # it really started at N
    for step in resumed:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert resumed[step][key] == straight[step][key], (step, key)
    want, got = _saved_state(straight_dir, STEPS), _saved_state(tmp_path, STEPS)
    _assert_states_equal(want, got)
    # mixed precision: bf16 compute (the default), fp32 master params and optimizer state
    assert all(v.dtype == np.float32 for k, v in got.items() if "params" in k or "mu" in k or "nu" in k)
    assert any("ema_loss" in k for k in got)  # FINCH's state is checkpointed


@pytest.mark.slow
def test_sigkill_mid_run_and_during_async_save_resumes_from_last_complete_checkpoint(
    straight_runs, data_file, tmp_path
):
    from train.checkpoint import Checkpointer

    straight_dir, mesh = straight_runs["data8"]
    overrides = _overrides(data_file, tmp_path, every=2, extra=mesh)
    # 1) SIGKILL from outside while training (the process sleeps after each step, so step 3 is mid-run).
    proc = _launch(overrides, sleep=1.0)
    for line in proc.stdout:
        if line.strip() == "step 3":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert Checkpointer(str(tmp_path / "ckpt")).latest_step() == 2
    # 2) Resume, and SIGKILL right after the asynchronous save of step 4 has started.
    rc, out, err = _train(overrides, kill_after_save=4)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "step 3" in out and "step 4" in out
    assert Checkpointer(str(tmp_path / "ckpt")).latest_step() == 2, "the interrupted save must not count"
    # 3) Resume again: from step 2, to the end, equal to the run that was never interrupted.
    rc, out, err = _train(overrides)
    assert rc == 0, err[-3000:]
    assert _steps_done(out) == list(range(3, STEPS + 1))
    _assert_states_equal(_saved_state(straight_dir, STEPS), _saved_state(tmp_path, STEPS))
    straight, resumed = _metrics(straight_dir), _metrics(tmp_path)
    for step in range(3, STEPS + 1):
        assert resumed[step]["loss"] == straight[step]["loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_the_one_process_run(data_file, tmp_path):
    """2 processes × 4 CPU devices (gloo collectives), each feeding its half of every batch, vs 1 × 8 devices.

    fp32 compute: gloo sums the gradients in another order than one process does, and bf16 compute turns that
    rounding into differences of ~1e-4 in Adam's moments after 8 steps (measured), which would hide a real bug.
    """
    mesh = ["mesh.data=-1", "mesh.fsdp=1", "model.dtype=float32"]
    straight_dir = tmp_path / "single"
    rc, _, err = _train(_overrides(data_file, straight_dir, every=STEPS // 2, extra=mesh))
    assert rc == 0, err[-3000:]
    multi_dir = tmp_path / "multi"
    tokens = tmp_path / "tokens"  # a cache of their own: process 0 builds it, process 1 maps it
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [
            sys.executable,
            "-m",
            "train",
            "finetune",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
            *_overrides(data_file, multi_dir, every=STEPS // 2, extra=[*mesh, f"data.cache_dir={tokens}"]),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert len([n for n in os.listdir(tokens) if not n.startswith(".")]) == 1  # one build for both processes
    assert re.search(r"token cache \S+ \(built in", outs[0][0]), outs[0][0]
    multi, single = _metrics(multi_dir), _metrics(straight_dir)
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step in multi:
        np.testing.assert_allclose(multi[step]["loss"], single[step]["loss"], rtol=1e-5)
        assert multi[step]["tokens"] == single[step]["tokens"]
    want, got = _saved_state(straight_dir, STEPS), _saved_state(multi_dir, STEPS)
    assert want.keys() == got.keys()
    for k in want:
        # only the order of the fp32 sums differs; Adam's near-sign first steps amplify that to ~1e-6 (lr 3e-3)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


if __name__ == "__main__":
    _worker([a for a in sys.argv[1:] if a != "--"])
