"""The PyTorch runner: ``transformers``' model of the same config with ``torch.optim.AdamW``, eager or compiled.

It runs only inside a worker process (:mod:`train.bench.worker`): next to a live XLA CPU client in one process,
PyTorch's eager steps were measured 5x slower than alone, which would flatter JAX.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from train.bench.profile_torch import profile_torch_step
from train.bench.runner import Runner, synthetic_batch
from train.bench.spec import BenchError, BenchSpec, model_config
from train.bench.stats import timed_steps

__all__ = ["build_torch_runner"]


def build_torch_runner(name: str, spec: BenchSpec, dtype_name: str, mode: str) -> Runner:
    """``transformers``' model of the spec's config + ``torch.optim.AdamW``; ``mode`` is eager or ``compile``.

    The same numerics as the JAX side: fp32 params and optimizer state, matmuls in ``dtype_name`` (bf16 via
    autocast), fp32 loss. ``compile_s`` is the first step's time minus a steady step's (compilation is lazy).
    """
    # Imported here: torch and transformers are the `bench` and `test` extras, not dependencies; a missing torch is
    # reported as this runner's error while the JAX sections run.
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BenchError(
            f"the PyTorch side of the benchmark needs torch and transformers ({e.name} is missing): run `make "
            "install-bench` in the finch-optax checkout, or there `pip install -c constraints.txt -e '.[bench]'`; "
            "or leave it out with --sections step,finch,profile"
        ) from None

    model_cfg = model_config(spec, dtype_name)
    hf = dict(model_cfg.to_hf_config())
    hf.pop("torch_dtype", None)
    hf.pop("architectures", None)
    model_type = hf.pop("model_type")
    hf["max_position_embeddings"] = max(hf["max_position_embeddings"], spec.seq_len)
    config = transformers.AutoConfig.for_model(model_type, **hf)
    torch.manual_seed(spec.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    tokens = synthetic_batch(model_cfg.vocab_size, spec.batch_size, spec.seq_len, spec.seed)["tokens"]
    ids = torch.from_numpy(tokens).long().to(device)
    if mode == "compile":
        # One inductor compile worker: a pool per core would hold gigabytes next to the benchmark's own models.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    forward = torch.compile(model) if mode == "compile" else model
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype_name == "bfloat16" else contextlib.nullcontext
    )

    def step() -> None:
        with autocast():
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    first, second = timed_steps(step, 2)
    info = {
        "framework": "torch",
        "mode": mode,
        "optimizer": "torch.optim.AdamW",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "first_step_s": first,
        "params": int(sum(int(np.prod(p.shape)) for p in model.parameters())),
    }

    def close() -> None:
        nonlocal model, optimizer, forward
        del model, optimizer, forward

    def profile(steps: int) -> dict[str, Any]:
        return profile_torch_step(step, steps=steps, vocab=model_cfg.vocab_size, mlp_dim=model_cfg.mlp_dim)

    return Runner(name=name, step=step, compile_s=max(first - second, 0.0), info=info, close=close, profile=profile)
