"""Where the PyTorch step's time goes: ``torch.profiler`` self times, split into the same op classes as JAX's.

Every profiled op's *self* time (its own time, children excluded) goes to one class of
:data:`train.bench.profile_xla.OP_CLASSES`: by the nearest enclosing op that names a part of the model (the fused
attention kernel, the loss, the embedding, the optimizer's step), else by the op itself — a matrix multiply by its
shapes (the vocabulary size marks the LM head, the MLP width the MLP, anything else a projection), a copy as a copy,
the rest as elementwise. The wall time no op covers is ``runtime`` (Python, autograd bookkeeping, dispatch).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from train.bench.profile_xla import (
    ATTN,
    CE,
    COPY,
    ELEMWISE,
    EMBED,
    LMHEAD,
    MLP,
    OP_CLASSES,
    OPT,
    OTHER,
    PROJ,
    RUNTIME,
)

__all__ = ["classify_torch_op", "profile_torch_step"]

_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::dot"}
_COPIES = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::empty_strided"}
_OTHER = {"aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::ones", "aten::ones_like"}
# Enclosing ops (or autograd nodes) that name a part of the model, checked from the op upward.
_ENCLOSING = (
    ("Optimizer.", OPT),
    ("scaled_dot_product", ATTN),
    ("ScaledDotProduct", ATTN),
    ("cross_entropy", CE),
    ("log_softmax", CE),
    ("LogSoftmaxBackward", CE),
    ("nll_loss", CE),
    ("NllLoss", CE),
    ("embedding", EMBED),
    ("EmbeddingBackward", EMBED),
)


def _matmul_class(shapes: Sequence[Sequence[int]], vocab: int, mlp_dim: int) -> str:
    dims = {d for s in shapes for d in (s or ())}
    if vocab in dims:
        return LMHEAD
    if mlp_dim in dims:
        return MLP
    return PROJ


def classify_torch_op(chain: Sequence[str], shapes: Sequence[Sequence[int]], *, vocab: int, mlp_dim: int) -> str:
    """The class of one op's self time.

    Args:
      chain: the op's name, then its enclosing ops' names outward (``aten::mm``, ``MmBackward0``, ...).
      shapes: the op's input shapes (``record_shapes=True``).
      vocab, mlp_dim: the model's vocabulary size and MLP width (what tells the matmuls apart).
    """
    for name in chain:
        for key, cls in _ENCLOSING:
            if key in name:
                return cls
    name = chain[0]
    if name in _MATMULS:
        return _matmul_class(shapes, vocab, mlp_dim)
    if name in _COPIES:
        return COPY
    if name in _OTHER or not name.startswith("aten::"):
        return OTHER
    return ELEMWISE


def profile_torch_step(step: Callable[[], None], *, steps: int, vocab: int, mlp_dim: int) -> dict[str, Any]:
    """Runs ``step`` (already warm) ``steps`` times under ``torch.profiler`` and splits its time by op class."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall_s = time.perf_counter() - start
    by_class: dict[str, float] = defaultdict(float)
    top: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        self_s = event.self_cpu_time_total / 1e6 / steps
        if self_s <= 0:
            continue
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        cls = classify_torch_op(chain, event.input_shapes or [], vocab=vocab, mlp_dim=mlp_dim)
        by_class[cls] += self_s
        top[cls][event.name] += self_s
    step_s = wall_s / steps
    # Ops of the autograd thread overlap nothing on CPU (the caller waits), so self times add up to wall time.
    by_class[RUNTIME] = max(step_s - sum(by_class.values()), 0.0)
    return {
        "framework": "torch",
        "steps": steps,
        "step_s": step_s,
        "seconds": {c: by_class.get(c, 0.0) for c in OP_CLASSES},
        "top_ops": {
            c: [[round(s, 5), n] for n, s in sorted(ops.items(), key=lambda kv: -kv[1])[:5]]
            for c, ops in top.items()
            if c in OP_CLASSES
        },
    }
