"""``finch-train SUB ...`` / ``python -m train SUB ...``: a thin dispatcher over importable modules.

Each subcommand names a ``module:function`` that takes ``argv`` (the arguments after the subcommand) and returns an
exit code. Modules are imported only when their subcommand runs, so ``finch-train --help`` is instant, and a missing
third-party dependency is one line naming the install command rather than a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("train.finetune:main", "fine-tune a model on text/JSONL with FINCH or a baseline"),
    "export": ("train.export:main", "write a Hugging Face model directory from a fine-tuning checkpoint"),
    "chat": (
        "train.generate:chat_main",
        "talk to a model (an export, a run folder or a checkpoint) with its chat template",
    ),
    "generate": ("train.generate:main", "greedy / sampled text generation from a model, export or checkpoint"),
    "demo": ("train.lab.demo:main", "SmolLM2-135M learns new facts: adamw vs finch_adamw vs a lower lr (make demo)"),
    "prepare": ("train.lab.sources:main", "download and cache the built-in datasets"),
    "eval": ("train.lab.evaluate:main", "evaluate a model: perplexity, quiz accuracy, fact recall"),
    "compare": ("train.lab.compare:main", "side-by-side FINCH vs baselines forgetting comparison"),
    "bench": ("train.bench.cli:main", "step-time / throughput benchmarks"),
    "compile": ("train.compile:main", "compile the train step for a TPU pod topology here: memory, fits, FLOPs, MFU"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: finch-train SUBCOMMAND [args...]   (or: python -m train SUBCOMMAND ...)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `finch-train SUBCOMMAND --help` for the subcommand's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches ``argv[0]`` to its subcommand's ``main(argv[1:])``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"finch-train: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        # libtpu (installed for `compile`) would otherwise be loaded by every jax process, even on hosts without a
        # TPU: it prints metadata warnings and takes a machine-wide lock. Harmless on TPU hosts (it does nothing).
        importlib.import_module("train.topology").quiet_libtpu_without_tpus()
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in _FIRST_PARTY:
            raise
        print(
            f"finch-train {name}: the training stack's dependency {e.name!r} is not installed; run `make install` in "
            f"the finch-optax checkout (or `pip install -c constraints.txt -e '.[lab]'` there)",
            file=sys.stderr,
        )
        return 2
    try:
        code = getattr(module, func_name)(rest)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"finch-train {name}: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


_FIRST_PARTY = ("finch_optax", "models", "train")

# Errors that describe bad input (config, data, mesh, checkpoint, model files): one clear line, no traceback.
_USER_ERRORS = (
    ("train.paths", "PathError"),
    ("train.documents", "DataError"),
    ("train.chat_template", "ChatTemplateError"),
    ("train.mesh", "ShardingError"),
    ("train.checkpoint", "CheckpointError"),
    ("train.runlock", "RunLockedError"),
    ("train.runlock", "UnwritableDirectoryError"),
    ("train.guard", "NonFiniteWeightsError"),
    ("models.config", "ConfigError"),
    ("models.weights", "WeightError"),
    ("models.gguf_loader", "GGUFError"),
    ("models.hf", "HFDirectoryError"),
    ("models.tokenizer", "TokenizerError"),
)


def _is_user_error(error: BaseException) -> bool:
    for module_name, class_name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False
