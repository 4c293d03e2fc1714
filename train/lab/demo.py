"""``finch-train demo`` (``make demo``): SmolLM2-135M learns fictional facts; AdamW vs ``finch_adamw`` vs a lower lr.

The ``compare`` of :data:`DEMO_CONFIG`, sized for about 10 minutes on 2 CPU cores, fetching the small retain sources
(about 10 MB of packages) on first use. Any ``compare`` flag overrides a demo default (``--steps``, ``--method``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from train.lab.compare import run_cli
from train.lab.config import CompareConfig
from train.lab.evalsets import EvalConfig
from train.lab.sources import prepare

__all__ = ["DEMO_CONFIG", "main"]

# Few facts and a high peak lr, so that 24 steps teach something.
DEMO_CONFIG = CompareConfig(
    model="gguf:smollm2",
    task="facts",
    facts_entities=4,
    methods=("sft", "finch", "sweep:lrs=1e-4"),
    steps=24,
    seeds=(0,),
    max_learning_rate=3e-4,
    batch_size=4,
    seq_len=48,
    eval=EvalConfig(seq_len=48, batch_size=8, retain_sequences=8, quiz_items=16),
    show_answers=6,
)


def _prepare_retain(cfg: CompareConfig) -> None:
    for source in ("austen", "brown", "quiz"):
        prepare(source, cfg.cache_dir or None, log=lambda msg: print(f"[demo] {msg}", flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    """``finch-train demo``: the comparison of :data:`DEMO_CONFIG`; flags as ``finch-train compare``."""
    return run_cli(
        argv,
        DEMO_CONFIG,
        "finch-train demo",
        out="runs/demo",
        description=__doc__.split("\n\n")[0],
        before_run=_prepare_retain,
    )
