"""The ``matmuls`` section: the model's own matmul shapes, timed alone, per framework, dtype and XLA flag set.

A train step's matmuls run at whatever speed the framework's CPU kernels reach for that shape and dtype; this
measures that speed directly, outside the step: for each ``[M, K] @ [K, N]`` of the model's forward pass (M = the
batch's tokens), the best GFLOP/s of ``--matmul-iters`` calls, for JAX (one worker process per XLA flag set: XLA
reads its flags once per process) and PyTorch (its own worker), in float32 and bfloat16. The workers take turns
shape by shape, so a load spike hits them alike; the best of the rounds is kept (a matmul's speed is only ever
lowered by interference).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MATMUL_DTYPES", "matmul_shapes", "time_matmuls"]

MATMUL_DTYPES = ("float32", "bfloat16")


def matmul_shapes(d_model: int, q_width: int, kv_width: int, mlp_dim: int, vocab: int, tokens: int) -> dict:
    """The forward matmuls of one block and the LM head as ``{name: (M, K, N)}`` (M = tokens)."""
    return {
        "q/o projection": (tokens, d_model, q_width),
        "k/v projection": (tokens, d_model, kv_width),
        "MLP gate/up": (tokens, d_model, mlp_dim),
        "MLP down": (tokens, mlp_dim, d_model),
        "LM head": (tokens, d_model, vocab),
    }


def _jax_matmul(m: int, k: int, n: int, dtype_name: str) -> Any:
    import jax  # noqa: PLC0415 - a PyTorch worker never imports it (see torch_runner)
    import jax.numpy as jnp  # noqa: PLC0415

    rng = np.random.default_rng(m + k + n)
    dtype = getattr(jnp, dtype_name)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
    f = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    f(a, b).block_until_ready()
    return lambda: f(a, b).block_until_ready()


def _torch_matmul(m: int, k: int, n: int, dtype_name: str) -> Any:
    import torch  # noqa: PLC0415 - the test extra, not a dependency

    gen = torch.Generator().manual_seed(m + k + n)
    dtype = getattr(torch, dtype_name)
    a = torch.randn((m, k), generator=gen).to(dtype)
    b = torch.randn((k, n), generator=gen).to(dtype)
    torch.matmul(a, b)

    def call() -> None:
        torch.matmul(a, b)

    return call


def time_matmuls(
    framework: str, shapes: dict[str, Sequence[int]], dtypes: Sequence[str], iters: int
) -> dict[str, dict[str, float]]:
    """``{shape name: {dtype: best GFLOP/s over iters calls}}`` for ``framework`` (``jax`` or ``torch``), in this
    process (with its XLA flags)."""
    build = _jax_matmul if framework == "jax" else _torch_matmul
    out: dict[str, dict[str, float]] = {}
    for name, (m, k, n) in shapes.items():
        out[name] = {}
        for dtype_name in dtypes:
            call = build(m, k, n, dtype_name)
            best = min(_timed(call) for _ in range(iters))
            out[name][dtype_name] = 2.0 * m * k * n / best / 1e9
    return out


def _timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
