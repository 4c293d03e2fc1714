"""Batched text generation with a KV cache: greedy or temperature / top-k sampling, one jit per shape.

Prompts of different lengths are left-padded; padding slots are marked invalid in the cache so no query attends to
them, and each row's rotary positions start at 0 at its first real token. Prompt lengths are bucketed to a multiple
of 16 so a CLI session does not recompile for every prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ConfigError
from models.transformer import CausalLM, init_cache

__all__ = ["check_room", "generate", "generate_stream"]

_PROMPT_BUCKET = 16
# Cache lengths are rounded up to this, so a chat session reuses one compiled decode step across turns.
_CACHE_BUCKET = 256


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: the LM.
      prompts: token-id lists (non-empty; lengths may differ).
      max_new_tokens: tokens to generate per prompt.
      temperature: 0 for greedy decoding, otherwise logits are divided by it before sampling.
      top_k: sample only among the ``top_k`` most likely tokens (``None``: all).
      rng: a ``jax.random.key`` for sampling (default ``key(0)``).
      eos_id: stop a row once it produces this token; the EOS itself is not returned.

    Returns:
      The new tokens of each prompt (prompt excluded), at most ``max_new_tokens`` each.

    Raises:
      ConfigError: a bad setting, or a prompt that with ``max_new_tokens`` more would exceed the model's context.
    """
    _check(model, prompts, max_new_tokens, temperature, top_k)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    tokens, real, positions = _left_padded(prompts)
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(real),
        jnp.asarray(positions),
        rng if rng is not None else jax.random.key(0),
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(-1 if eos_id is None else eos_id),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        greedy=temperature == 0.0,
    )
    out = np.asarray(out)
    results = []
    for row in out:
        row = row.tolist()
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def generate_stream(
    model: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yields the continuation of one prompt token by token, as each is decoded (for printing while generating).

    Sampling is the same as :func:`generate`'s; it stops after ``max_new_tokens`` or at a token in ``stop_ids``
    (not yielded). Prompt lengths and cache sizes are bucketed so that a chat session compiles only a few times.
    """
    _check(model, [prompt], max_new_tokens, temperature, top_k)
    tokens, real, positions = _left_padded([prompt])
    cache_len = -(-(tokens.shape[1] + max_new_tokens) // _CACHE_BUCKET) * _CACHE_BUCKET
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(real), jnp.asarray(positions), cache_len)
    key = rng if rng is not None else jax.random.key(0)
    position = len(prompt)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token, logits, cache = _decode_one(
            graphdef,
            state,
            logits,
            cache,
            jnp.int32(position),
            sub,
            jnp.float32(max(temperature, 1e-6)),
            top_k=top_k,
            greedy=temperature == 0.0,
        )
        token = int(token)
        if token in stop_ids:
            return
        yield token
        position += 1


def _check(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_k):
    """Refuses a request that cannot run as asked, before anything is compiled (:class:`ConfigError`)."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one prompt and every prompt needs at least one token")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ConfigError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ConfigError(f"prompt {i} holds token ids outside [0, {vocab}): {bad[:5]}")
    check_room(max(len(p) for p in prompts), max_new_tokens, model.config.max_position_embeddings)


def check_room(prompt_tokens: int, max_new_tokens: int, context: int, setting: str = "max_new_tokens") -> None:
    """Refuses a prompt of ``prompt_tokens`` that, with ``max_new_tokens`` more, would run past the ``context``.

    Positions past the context the model was trained on give meaningless text (and the KV cache grows with them),
    so generation never goes there silently.
    """
    if prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise ConfigError(
            f"a prompt of {prompt_tokens} tokens leaves no room for new tokens in the model's context of {context}"
        )
    raise ConfigError(
        f"a prompt of {prompt_tokens} tokens plus {setting} {max_new_tokens} is {prompt_tokens + max_new_tokens} "
        f"tokens, past the model's context of {context}; ask for at most {context - prompt_tokens} new tokens"
    )


def _left_padded(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, real, positions)`` [B, width]: prompts left-padded to a multiple of the prompt bucket."""
    lengths = np.array([len(p) for p in prompts])
    width = int(-(-lengths.max() // _PROMPT_BUCKET) * _PROMPT_BUCKET)
    tokens = np.zeros((len(prompts), width), np.int32)
    real = np.zeros((len(prompts), width), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt) :] = prompt
        real[i, width - len(prompt) :] = 1
    positions = np.maximum(np.arange(width)[None, :] - (width - lengths)[:, None], 0).astype(np.int32)
    return tokens, real, positions


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int | None, greedy: bool) -> jax.Array:
    """The next token of each row: argmax, or a sample from ``softmax(logits / temperature)`` over the top k."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens, real, positions, cache_len):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], cache_len)
    logits, cache = model(tokens, positions, real, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "greedy"))
def _decode_one(graphdef, state, last_logits, cache, position, key, temperature, *, top_k, greedy):
    model = nnx.merge(graphdef, state)
    token = _pick(last_logits, key, temperature, top_k, greedy)
    logits, cache = model(token[:, None], jnp.broadcast_to(position, (token.shape[0], 1)), cache=cache)
    return token[0], logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy"))
def _generate(graphdef, state, tokens, real, positions, rng, temperature, eos_id, *, max_new_tokens, top_k, greedy):
    model = nnx.merge(graphdef, state)
    batch, width = tokens.shape
    cache = init_cache(model.config, batch, width + max_new_tokens)
    logits, cache = model(tokens, positions, real, cache=cache)

    def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
        return _pick(logits, key, temperature, top_k, greedy)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, last_logits, next_pos, out, done, key = carry
        key, sub = jax.random.split(key)
        token = pick(last_logits, sub)
        token = jnp.where(done, jnp.maximum(eos_id, 0), token)
        out = out.at[:, step].set(token)
        done = done | (token == eos_id)
        logits, cache = model(token[:, None], next_pos[:, None], cache=cache)
        return step + 1, cache, logits[:, -1], next_pos + 1, out, done, key

    out = jnp.full((batch, max_new_tokens), jnp.maximum(eos_id, 0), jnp.int32)
    carry = (jnp.int32(0), cache, logits[:, -1], positions[:, -1] + 1, out, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, carry)[4]
