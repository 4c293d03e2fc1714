"""The MFU basis: a square matmul in the compute dtype, timed on this machine in this run.

:func:`measure_matmul_peak` runs at the start; :func:`build_peak_probe` is a runner that repeats the measurement
between the train steps, under the same load (``docs/bench.md`` says which of the two MFU uses and why).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.bench.runner import Runner
from train.bench.stats import timed_steps

__all__ = ["build_peak_probe", "measure_matmul_peak"]


def _random_squares(n: int, dtype_name: str, device: Any, count: int) -> list[jax.Array]:
    rng = np.random.default_rng(n)
    dtype = getattr(jnp, dtype_name)
    return [jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dtype), device) for _ in range(count)]


def measure_matmul_peak(dtype_name: str, *, sizes: Sequence[int] | None = None, iters: int = 5) -> dict[str, Any]:
    """Median FLOP/s of a jit-compiled square matmul on the first device, for each size; the best is the peak.

    On CPU the simulated devices share the same cores, so this single-device figure is the machine's peak; on
    accelerators the run's peak is this times the number of devices.
    """
    device = jax.devices()[0]
    if sizes is None:
        sizes = (1024, 2048) if device.platform == "cpu" else (4096, 8192)
    matmul = jax.jit(lambda a, b: a @ b)
    by_size = {}
    for n in sizes:
        a, b = _random_squares(n, dtype_name, device, 2)
        compiled = matmul.lower(a, b).compile()
        compiled(a, b).block_until_ready()
        times = timed_steps(lambda: compiled(a, b).block_until_ready(), iters)  # noqa: B023 - called at once
        by_size[str(n)] = 2.0 * n**3 / statistics.median(times)
    per_device = max(by_size.values())
    num = 1 if device.platform == "cpu" else jax.device_count()
    return {
        "dtype": dtype_name,
        "iters": iters,
        "flops_per_s_by_size": by_size,
        "per_device_flops_per_s": per_device,
        "devices_counted": num,
        "peak_flops_per_s": per_device * num,
    }


def build_peak_probe(dtype_name: str, size: int, calls: int = 3) -> tuple[Runner, float]:
    """A runner whose "step" is ``calls`` square matmuls: interleaved with the train steps, it measures the peak
    under the same load as the steps, so MFU is itself a ratio measured side by side.

    Returns:
      ``(runner, flops_per_step)``.
    """
    (a,) = _random_squares(size, dtype_name, jax.devices()[0], 1)
    compiled = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    compiled(a, a).block_until_ready()

    def step() -> None:
        for _ in range(calls):
            compiled(a, a).block_until_ready()

    info = {"size": size, "calls": calls, "dtype": dtype_name}
    return Runner(name="matmul peak probe", step=step, compile_s=None, info=info), calls * 2.0 * size**3
