"""Talk to a model: ``finch-train generate`` continues prompts, ``finch-train chat`` holds a conversation rendered
with the model's chat template; both print tokens as they are decoded.

The model is named in one of three ways:

* an exported Hugging Face directory (``runs/NAME/hf``, or any directory with ``config.json`` + safetensors);
* a PEFT LoRA adapter directory (``runs/NAME/hf-adapter``) on the base its ``adapter_config.json`` names;
* a run folder (``runs/NAME``) or an orbax checkpoint directory: its newest checkpoint, or ``--step N``;
* a model source as in ``model.source``: ``gguf:smollm2``, ``hf:DIR``, ``hub:REPO_ID``, ``gguf:PATH``, ``preset:NAME``.

::

    finch-train chat runs/smollm2-chat/hf
    finch-train generate --model runs/smollm2-chat/hf --chat --prompt "Where was Gloutha Krimend born?"
    finch-train generate --model gguf:smollm2 --prompt "The capital of France is" --temperature 0.7 --top-k 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax

import models
from models import lora
from models.config import ConfigError
from models.generate import check_room
from models.hub import looks_like_repo_id
from models.load import resolve_dtype
from train import config as config_lib
from train import export as export_lib
from train import paths, storage
from train.chat_template import ChatTemplate, ChatTemplateError, special_token_text
from train.program import load_model

__all__ = ["Loaded", "chat_main", "complete", "load_for_generation", "main", "stream_text"]


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
    """Continuations of each prompt (greedy at ``temperature=0``), decoded to text (the prompt not included).

    All prompts are decoded together in one compiled loop (no streaming); :func:`stream_text` streams one.
    """
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


@dataclasses.dataclass
class Loaded:
    """A model ready to talk to: ``template`` is ``None`` when it has no chat template."""

    model: Any
    tokenizer: Any
    template: ChatTemplate | None
    description: str


def load_for_generation(
    spec: str, *, step: int | None = None, dtype: str = "float32", chat_template: str = ""
) -> Loaded:
    """Loads an HF export, a run folder / checkpoint, or a model source (see the module docstring).

    ``chat_template`` is a Jinja file used instead of the model's own template.
    """
    template_text = None
    shown, spec = spec, _local_directory(spec)
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        model, tokenizer, description = _load_adapter(spec, dtype)
    elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        model, tokenizer = models.load(f"hf:{spec}", dtype=dtype)
        description = f"{shown} (Hugging Face directory)"
    elif os.path.isdir(spec):
        loaded = export_lib.load_checkpoint(spec, step, dtype=dtype)
        model, tokenizer, template_text = loaded.model, loaded.tokenizer, loaded.chat_template
        description = f"{loaded.directory} step {loaded.step} (fine-tuned from {loaded.config.model.source})"
    else:
        model, tokenizer = models.load(spec, dtype=dtype)
        description = spec
    bos = special_token_text(tokenizer, tokenizer.bos_id)
    eos = special_token_text(tokenizer, tokenizer.eos_id)
    if chat_template:
        template = ChatTemplate.for_model(tokenizer, chat_template)
    elif template_text:
        template = ChatTemplate(template_text, bos_token=bos, eos_token=eos, origin="the run's chat template")
    else:
        template = ChatTemplate.for_model(tokenizer)
    return Loaded(model, tokenizer, template, description)


def model_context(spec: str) -> int | None:
    """The context length of the model ``spec`` names (as :func:`load_for_generation` takes it), read from its
    config without loading any weight; ``None`` for a checkpoint directory outside a run folder.

    Raises:
      ConfigError: ``spec`` names no model (a missing path, a malformed name, a folder without a config).
    """
    spec = _local_directory(spec)
    if os.path.isfile(os.path.join(spec, "adapter_config.json")):
        return models.load_config(_adapter_base(spec)).max_position_embeddings
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "config.json")):
            return models.load_config(f"hf:{spec}").max_position_embeddings
        for run_dir in (spec, os.path.dirname(os.path.abspath(spec))):  # a run folder, or its checkpoint directory
            if os.path.isfile(os.path.join(run_dir, "config.yaml")):
                cfg = config_lib.load_config(os.path.join(run_dir, "config.yaml"))
                return models.load_config(cfg.model.source).max_position_embeddings
        return None
    return models.load_config(spec).max_position_embeddings


def _local_directory(spec: str) -> str:
    """``spec`` itself, or for a ``gs://`` Hugging Face export or PEFT adapter directory (``gs://.../run/hf``) its
    local copy (downloaded once, see :func:`train.storage.local_copy`).

    Raises:
      StorageError: an unreachable bucket, or a URL that is neither of the two (a run folder's checkpoints are
        not downloaded: export them first, or give the run's ``hf/``).
    """
    if not storage.is_url(spec):
        return spec
    storage.check(spec, "the model")
    if not any(storage.exists(storage.join(spec, name)) for name in ("config.json", "adapter_config.json")):
        raise storage.StorageError(
            f"{spec} holds no config.json or adapter_config.json: give a Hugging Face export or a PEFT adapter "
            "directory in the bucket (a run folder's hf/ or hf-adapter/)"
        )
    return storage.local_copy(spec)


def _adapter_base(directory: str) -> str:
    """The model source of the base a PEFT LoRA adapter directory names (``base_model_name_or_path``)."""
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as f:
        adapter_config = json.load(f)
    base = adapter_config.get("base_model_name_or_path") or ""
    if os.path.isdir(base):
        base = f"hf:{base}"
    elif looks_like_repo_id(base):
        revision = adapter_config.get("revision")
        base = f"hub:{base}{f'@{revision}' if revision else ''}"
    if ":" not in base:
        raise models.ConfigError(
            f"{directory}: the adapter's base_model_name_or_path {base!r} is neither a model source (gguf:PATH, "
            "hf:DIR, hub:REPO_ID, preset:NAME), a Hub repo id nor a directory here; load its base with transformers "
            "+ peft instead"
        )
    return base


def _load_adapter(directory: str, dtype: str) -> tuple[Any, Any, str]:
    """A PEFT LoRA adapter directory (``runs/NAME/hf-adapter``) on the base its ``base_model_name_or_path`` names:
    a model source (``gguf:smollm2``, ``preset:NAME``), a Hugging Face directory or a Hub repo id (with the
    adapter's ``revision``)."""
    base = _adapter_base(directory)
    model, tokenizer = models.load(base, dtype=dtype)
    model, spec = lora.load_peft(model, directory)
    return lora.merge_lora(model), tokenizer, f"{directory} (LoRA rank {spec.rank} on {base})"


def _stop_ids(tokenizer: Any, end_of_turn: str) -> tuple[int, ...]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if end_of_turn and token_to_id is not None and token_to_id(end_of_turn) is not None:
        ids.add(token_to_id(end_of_turn))
    return tuple(ids)


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    stop_text: str = "",
) -> Iterator[str]:
    """The continuation of ``prompt_ids`` as text pieces, each yielded as soon as it is decoded.

    Generation ends at a token in ``stop_ids`` or where the text reaches ``stop_text`` (neither is yielded). A piece
    is held back while it may be the start of ``stop_text`` or ends inside a multi-byte character.
    """
    new_ids: list[int] = []
    shown = ""
    tokens = models.generate_stream(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
        stop_ids=stop_ids,
    )
    for token in tokens:
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        if stop_text and stop_text in text:
            yield text[: text.index(stop_text)][len(shown) :]
            return
        if text.endswith("\ufffd"):
            continue
        keep = next((n for n in range(len(stop_text) - 1, 0, -1) if text.endswith(stop_text[:n])), 0)
        if len(text) - keep > len(shown):
            yield text[len(shown) : len(text) - keep]
            shown = text[: len(text) - keep]
    text = tokenizer.decode(new_ids)
    if len(text) > len(shown):
        yield text[len(shown) :]


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _check_sampling_args(args: argparse.Namespace, context: int | None) -> None:
    """Refuses sampling settings that cannot run, before the model loads (``context``: the model's, when known)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):
        raise ConfigError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step must be >= 0, got {args.step}")
    resolve_dtype(args.dtype, "--dtype")
    if args.chat_template:
        paths.check_file_to_read(args.chat_template, "--chat-template")
    if context is not None and args.max_new_tokens >= context:
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens; ask for at most {context - 1}"
        )


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    parser.add_argument("--chat-template", default="", help="a Jinja chat template file instead of the model's own")


def _need_template(loaded: Loaded) -> ChatTemplate:
    if loaded.template is None:
        raise ChatTemplateError(
            f"{loaded.description} has no chat template; pass --chat-template FILE (e.g. configs/chatml.jinja)"
        )
    return loaded.template


def _chat_prompt(loaded: Loaded, messages: list[dict[str, str]], args: argparse.Namespace) -> list[int]:
    """The token ids of ``messages`` rendered for the assistant's reply, checked to leave room for it."""
    template = _need_template(loaded)
    template.check_roles(m["role"] for m in messages)
    ids = loaded.tokenizer.encode(template.render(messages, add_generation_prompt=True))
    check_room(len(ids), args.max_new_tokens, loaded.model.config.max_position_embeddings, "--max-new-tokens")
    return ids


def _text_prompt(loaded: Loaded, prompt: str, args: argparse.Namespace) -> list[int]:
    """The token ids of a prompt to continue, checked to leave room for the continuation."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt, add_bos=tok.bos_id is not None)
    check_room(len(ids), args.max_new_tokens, loaded.model.config.max_position_embeddings, "--max-new-tokens")
    return ids


def _reply(loaded: Loaded, ids: list[int], args: argparse.Namespace) -> str:
    """Streams the assistant's reply to the rendered conversation ``ids`` to stdout and returns it."""
    end = _need_template(loaded).end_of_turn()
    pieces = []
    for piece in stream_text(
        loaded.model,
        loaded.tokenizer,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=_stop_ids(loaded.tokenizer, end),
        stop_text=end,
    ):
        pieces.append(piece)
        _write(piece)
    _write("\n")
    return "".join(pieces)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finch-train generate",
        description="Continue prompts with a model: an HF export, a run folder or checkpoint, or a model source. "
        "Prints each prompt, an arrow, and the continuation as it is decoded.",
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--model", default=None, help="HF export dir, run folder, checkpoint dir, or model source")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory (same as --model DIR)")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user message (chat template)")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--config", default=None, help="YAML config whose model.source is used without --model")
    _add_sampling_args(parser, max_new_tokens=32)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (model.*) without --model")
    args = parser.parse_args(argv)
    spec = args.model or args.checkpoint
    if spec is None:
        cfg = config_lib.load_config(args.config, args.overrides)
        _check_sampling_args(args, models.load_config(cfg.model.source).max_position_embeddings)
        model, tokenizer = load_model(cfg.model, dtype=args.dtype)
        template = (
            None if not (args.chat or args.chat_template) else ChatTemplate.for_model(tokenizer, args.chat_template)
        )
        loaded = Loaded(model, tokenizer, template, cfg.model.source)
    else:
        _check_sampling_args(args, model_context(spec))
        loaded = load_for_generation(spec, step=args.step, dtype=args.dtype, chat_template=args.chat_template)
    system = [{"role": "system", "content": args.system}] if args.system else []
    # Every prompt is rendered and checked against the context before the first one is generated.
    if args.chat:
        prompts = [_chat_prompt(loaded, [*system, {"role": "user", "content": p}], args) for p in args.prompt]
    else:
        prompts = [_text_prompt(loaded, p, args) for p in args.prompt]
    tok = loaded.tokenizer
    for prompt, ids in zip(args.prompt, prompts):
        _write(f"{prompt}\u2192")
        if args.chat:
            _reply(loaded, ids, args)
            continue
        stop = (tok.eos_id,) if tok.eos_id is not None else ()
        for piece in stream_text(
            loaded.model,
            tok,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            stop_ids=stop,
        ):
            _write(piece)
        _write("\n")
    return 0


def chat_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finch-train chat",
        description="Chat with a model through its chat template, reading one user message per line from stdin "
        "and printing the reply as it is decoded. /reset starts over; /exit or Ctrl-D ends.",
    )
    parser.add_argument("model", help="HF export dir (runs/NAME/hf), run folder, checkpoint dir, or model source")
    parser.add_argument("--system", default=None, help="a system message at the start of the conversation")
    _add_sampling_args(parser, max_new_tokens=256)
    args = parser.parse_args(argv)
    _check_sampling_args(args, model_context(args.model))
    loaded = load_for_generation(args.model, step=args.step, dtype=args.dtype, chat_template=args.chat_template)
    template = _need_template(loaded)
    if args.system:
        template.check_roles(["system"])  # before the first message, not at it
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"chatting with {loaded.description}; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(start)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            _write("assistant> ")
        try:
            reply = _reply(loaded, _chat_prompt(loaded, messages, args), args)
        except (ChatTemplateError, ConfigError) as e:  # this message only: the conversation goes on without it
            hint = " (type /reset to start over)" if isinstance(e, ConfigError) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
    return 0
