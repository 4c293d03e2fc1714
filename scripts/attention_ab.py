"""Times one attention layer's forward + backward for each implementation, side by side (A B C ... rounds).

    .venv/bin/python scripts/attention_ab.py                      # SmolLM2's shapes: 4 x 512 tokens, 9/3 heads of 64
    .venv/bin/python scripts/attention_ab.py --blocks 1,2,4,8,16 --rounds 15

Each entry is ``models.attention.attend(impl, ...)`` under ``jax.value_and_grad`` of a weighted sum of its output,
jit-compiled; ``blockwise/N`` is the blockwise implementation with N query blocks. It prints every entry's median
time, its ratio to the first entry with the range of per-round ratios, its compiled temporaries, its largest
difference from the first entry, and the load average (the machine may be shared: trust the ratios, not the times).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import MASKED_SCORE, attend
from models.blockwise_attention import blockwise_attention


def _impl(name: str):
    if name.startswith("blockwise/"):
        blocks = int(name.split("/")[1])
        return lambda q, k, v, mask: blockwise_attention(q, k, v, mask, masked_score=MASKED_SCORE, blocks=blocks)
    return lambda q, k, v, mask: attend(name, q, k, v, mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4,512,9,3,64", help="batch,seq,heads,kv_heads,head_dim")
    p.add_argument("--impls", default="dense,dot_product", help="implementations before the blockwise ones")
    p.add_argument("--blocks", default="1,2,4,8,16", help="query block counts of blockwise entries")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    b, t, h, kv, d = (int(x) for x in args.shape.split(","))
    names = [n for n in args.impls.split(",") if n] + [f"blockwise/{n}" for n in args.blocks.split(",") if n]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32) for _ in range(2))
    weight = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    idx = np.arange(t)
    mask = jnp.asarray(np.broadcast_to(idx[:, None] >= idx[None, :], (b, t, t)))
    compiled, first = {}, None
    for name in names:
        loss = functools.partial(lambda fn, q, k, v: jnp.sum(fn(q, k, v, mask) * weight), _impl(name))
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        out = jax.block_until_ready(fn(q, k, v))
        first = out if first is None else first
        diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(first)))
        temp = fn.memory_analysis().temp_size_in_bytes
        compiled[name] = (fn, diff, temp)
    times: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name][0](q, k, v))
            times[name].append(time.perf_counter() - start)
    base = names[0]
    print(f"attention forward+backward, shape b,t,h,kv,d = {args.shape}, {args.rounds} interleaved rounds")
    print(f"| impl | median ms | / {base} | per-round range | temp MB | max abs diff vs {base} |")
    print("|---|---:|---:|---|---:|---:|")
    for name in names:
        rounds = [x / y for x, y in zip(times[name], times[base])]
        med = statistics.median(times[name])
        print(
            f"| {name} | {med * 1e3:.1f} | {med / statistics.median(times[base]):.3f} | "
            f"{min(rounds):.2f} .. {max(rounds):.2f} | {compiled[name][2] / 1e6:.0f} | {compiled[name][1]:.1e} |"
        )
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
