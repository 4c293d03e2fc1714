"""Worker processes: runners that need a process of their own, stepped in turns over stdin/stdout.

XLA reads its flags and the simulated device count once per process, and PyTorch steps slower next to a live XLA
client, so the ``flags``, ``scaling`` and ``torch`` runners live in ``python -m train.bench.worker JOB`` processes.
Protocol, one JSON object per line: the worker prints ``TAG {"ready": ...}`` once its runners are compiled, answers
each ``{"op": "run", "name": N, "steps": k}`` with ``TAG {"times": [...]}`` (timed inside the worker), each
``{"op": "profile", ...}`` with ``TAG {"profile": {...}}`` (the runner's time by op class), each ``{"op": "matmuls",
...}`` with ``TAG {"matmuls": {...}}`` (:mod:`train.bench.matmuls`) and exits on
``{"op": "quit"}``. Only one worker computes at a time, so workers take turns like in-process runners.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from train.bench.jax_runner import build_jax_runner
from train.bench.matmuls import time_matmuls
from train.bench.runner import Runner, log
from train.bench.spec import BenchError, BenchSpec, compute_dtype_name, spec_from_json
from train.bench.stats import step_result, timed_steps
from train.bench.torch_runner import build_torch_runner
from train.malloc import describe as describe_malloc

__all__ = ["TAG", "Worker", "main", "run_worker_section", "serve", "worker_env", "worker_results"]

TAG = "BENCH_WORKER "

# (worker label, job, environment) of one worker process
Job = tuple[str, dict[str, Any], dict[str, str]]


def worker_env(
    device_count: int, xla_flags: str, platform: str | None = "cpu", source: str | os.PathLike | None = None
) -> dict[str, str]:
    """This process's environment with ``device_count`` simulated devices and ``xla_flags`` added to XLA_FLAGS;
    the worker imports ``models``/``train`` from ``source`` (a checkout of this repository; default this one)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
    flags.extend(xla_flags.split())
    env["XLA_FLAGS"] = " ".join(flags)
    if platform is not None:
        env.setdefault("JAX_PLATFORMS", platform)
    repo = str(Path(source).resolve() if source is not None else Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else repo
    return env


class Worker:
    """The parent's handle on one worker process: :meth:`receive` its ready message, :meth:`run` steps on it."""

    def __init__(self, label: str, job: dict[str, Any], env: dict[str, str], timeout_s: float):
        self.label, self.timeout_s = label, timeout_s
        self._stderr = tempfile.TemporaryFile(mode="w+")
        # -P: the working directory is not put on sys.path, so PYTHONPATH alone says which checkout is imported.
        cmd = [sys.executable, "-P", "-m", "train.bench.worker", json.dumps(job)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self._lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                if line.startswith(TAG):
                    self._lines.put(line[len(TAG) :])
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def _error_tail(self) -> str:
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()][-3:]
        return " | ".join(tail)[:800]

    def receive(self) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise BenchError(f"worker {self.label}: no answer within {self.timeout_s:.0f} s") from None
        if line is None:
            self.proc.wait()
            raise BenchError(f"worker {self.label} exited with {self.proc.returncode}: {self._error_tail()}")
        return json.loads(line)

    def run(self, name: str, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"op": "run", "name": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self.receive()["times"]

    def matmuls(self, framework: str, shapes: dict, dtypes: Sequence[str], iters: int) -> dict[str, Any]:
        """Best GFLOP/s per shape and dtype of ``framework``'s matmuls in the worker (:mod:`train.bench.matmuls`)."""
        op = {"op": "matmuls", "framework": framework, "shapes": shapes, "dtypes": list(dtypes), "iters": iters}
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()
        return self.receive()["matmuls"]

    def profile(self, name: str, steps: int) -> dict[str, Any]:
        """The runner's time split by op class over ``steps`` profiled steps (:attr:`Runner.profile`)."""
        self.proc.stdin.write(json.dumps({"op": "profile", "name": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self.receive()["profile"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def run_worker_section(
    label: str, jobs: Sequence[Job], spec: BenchSpec, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[list[float]]]]:
    """Starts the workers one after another (compiles never overlap), then times all their runners interleaved.

    Returns:
      ``(ready, times)``: each worker's ready message (``{"label", "runners": [...], "errors": [...], ...}`` or
      ``{"label", "error"}``), and ``(worker label, runner name) -> [rounds][steps]`` times.
    """
    workers: list[tuple[Worker, dict[str, Any]]] = []
    ready_all: list[dict[str, Any]] = []
    try:
        for i, (wlabel, job, env) in enumerate(jobs):
            log(f"{label}: starting worker {wlabel} ({i + 1}/{len(jobs)}) and compiling")
            worker = Worker(wlabel, job, env, timeout_s)
            try:
                ready = {"label": wlabel, **worker.receive()["ready"]}
            except BenchError as e:
                worker.close()
                ready_all.append({"label": wlabel, "error": str(e)})
                log(f"{label}: {e}")
                continue
            ready_all.append(ready)
            workers.append((worker, ready))
            for r in ready["runners"]:
                if spec.warmup:
                    worker.run(r["name"], spec.warmup)
        times: dict[tuple[str, str], list[list[float]]] = {}
        order = [(w, r["name"], ready["label"]) for w, ready in workers for r in ready["runners"]]
        log(
            f"{label}: timing {len(order)} runners in {len(workers)} workers interleaved, "
            f"{spec.rounds} rounds x {spec.steps} steps"
        )
        for rnd in range(spec.rounds):
            for worker, name, wlabel in order:
                log(f"{label}: round {rnd + 1}/{spec.rounds}: {wlabel} {name}")
                times.setdefault((wlabel, name), []).append(worker.run(name, spec.steps))
        return ready_all, times
    finally:
        for worker, _ in workers:
            worker.close()


def worker_results(
    ready_all: list[dict[str, Any]],
    times: dict[tuple[str, str], list[list[float]]],
    *,
    tokens: int,
    step_flops: float,
    peak: float | None,
) -> list[dict[str, Any]]:
    """One result per worker runner (``"worker"`` names its worker), and one per worker or runner that failed."""
    results = []
    for ready in ready_all:
        if "error" in ready:
            results.append({"worker": ready["label"], "error": ready["error"]})
            continue
        for r in ready["runners"]:
            t = times[(ready["label"], r["name"])]
            entry = step_result(
                r["name"], r["compile_s"], t, r["info"], tokens=tokens, step_flops=step_flops, peak=peak
            )
            results.append({"worker": ready["label"], **entry})
        for err in ready.get("errors", []):
            results.append({"worker": ready["label"], **err})
    return results


def _layout_mesh(layout: str, n: int) -> str:
    return "data=1" if layout == "single" else f"{layout}={n}" + ("" if layout == "data" else ",data=1")


def _build(layout: str, spec: BenchSpec, dtype_name: str) -> Runner:
    """``torch MODE`` -> the PyTorch runner; ``single`` / ``data`` / ``fsdp`` / ``tensor`` -> the JAX step."""
    if layout.startswith("torch "):
        return build_torch_runner(layout, spec, dtype_name, layout.split()[1])
    devices = jax.devices()[:1] if layout == "single" else None
    mesh_text = _layout_mesh(layout, jax.device_count())
    return build_jax_runner(layout, spec, dtype_name, "finch_adamw", mesh_text=mesh_text, devices=devices)


def serve(job: dict[str, Any]) -> None:
    """The worker side: build the job's runners, say ready, step them on request until ``quit``."""
    spec = spec_from_json(job["spec"])
    dtype_name = job.get("dtype") or compute_dtype_name(spec, jax.default_backend())
    runners: dict[str, Runner] = {}
    errors = []
    for layout in job["layouts"]:
        try:
            runners[layout] = _build(layout, spec, dtype_name)
        except Exception as e:  # noqa: BLE001 - torch missing or a layout that cannot run is a result, not a crash
            error: dict[str, Any] = {"name": layout}
            if not layout.startswith("torch "):
                error.update(devices=jax.device_count(), layout=layout)
            errors.append({**error, "error": f"{type(e).__name__}: {e}"[:500]})
    ready = {
        "runners": [{"name": k, "compile_s": r.compile_s, "info": r.info} for k, r in runners.items()],
        "errors": errors,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc": describe_malloc(),
    }
    print(TAG + json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "matmuls":
            rates = time_matmuls(cmd["framework"], cmd["shapes"], cmd["dtypes"], int(cmd["iters"]))
            print(TAG + json.dumps({"matmuls": rates}), flush=True)
            continue
        runner = runners[cmd["name"]]
        if cmd["op"] == "profile":
            print(TAG + json.dumps({"profile": runner.profile(int(cmd["steps"]))}), flush=True)
            continue
        times = timed_steps(runner.step, int(cmd["steps"]))
        print(TAG + json.dumps({"times": times}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.bench.worker JOB_JSON``: started by :class:`Worker`, not by hand."""
    argv = sys.argv[1:] if argv is None else argv
    serve(json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
