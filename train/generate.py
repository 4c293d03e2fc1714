"""Text generation from a model config, optionally with fine-tuned params from a checkpoint.

``finch-train generate --prompt "The capital of France is" model.source=gguf:smollm2``
``finch-train generate --checkpoint runs/x/ckpt --prompt "..."`` (model config read from the checkpoint)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax

import models
from train import config as config_lib
from train import step as step_lib
from train.checkpoint import Checkpointer, CheckpointError
from train.finetune import load_model
from train.optimizers import make_optimizer

__all__ = ["complete", "load_checkpoint_params", "main"]


def complete(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    add_bos: bool = True,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continuations of each prompt (greedy at ``temperature=0``), decoded to text (the prompt not included)."""
    ids = [tokenizer.encode(p, add_bos=add_bos and tokenizer.bos_id is not None) for p in prompts]
    out = models.generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
        eos_id=tokenizer.eos_id if stop_at_eos else None,
    )
    return [tokenizer.decode(seq) for seq in out]


def load_checkpoint_params(directory: str, step: int | None = None) -> tuple[Any, Any, config_lib.TrainConfig]:
    """``(model, tokenizer, cfg)``: the checkpoint's model config, loaded, with the checkpoint's params."""
    ckpt = Checkpointer(directory, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory!r}")
        meta = ckpt.read_meta(step)
        cfg = config_lib.from_dict(meta["config"])
        model, tokenizer = load_model(cfg.model)
        _, params, merge = step_lib.split_model(model)
        tx = make_optimizer(cfg.optimizer, total_steps=cfg.steps)
        abstract = jax.eval_shape(
            lambda p: step_lib.init_train_state(p, tx, seed=cfg.seed, l2sp=cfg.l2sp_weight > 0), params
        )
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return merge(state.params), tokenizer, cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finch-train generate", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory written by `finetune`")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--config", default=None, help="YAML config (its model section is used)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (model.*)")
    args = parser.parse_args(argv)
    if args.checkpoint:
        model, tokenizer, _ = load_checkpoint_params(args.checkpoint, args.step)
    else:
        cfg = config_lib.load_config(args.config, args.overrides)
        model, tokenizer = load_model(cfg.model)
    texts = complete(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}\u2192{text}")
    return 0
