"""models.generate: KV-cached, jit-compiled decoding must equal naive re-running of the full forward."""

import jax
import numpy as np
import pytest
from flax import nnx

import models

WIDTH = 32


@pytest.fixture(scope="module")
def tiny():
    return models.CausalLM(models.get_preset("tiny"), rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def last_logits(tiny):
    """Logits after the last token of ``ids``, from a full (cache-free) forward of fixed width (one compile)."""
    forward = nnx.jit(lambda m, t: m(t))

    def fn(ids):
        tokens = np.zeros((1, WIDTH), np.int32)
        tokens[0, : len(ids)] = ids  # right padding cannot affect earlier positions under the causal mask
        return np.asarray(forward(tiny, tokens))[0, len(ids) - 1]

    return fn


def _naive_greedy(last_logits, prompt, steps, eos_id=None):
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(np.argmax(last_logits(ids)))
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


PROMPTS = [[5, 17, 300, 2], [9], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116]]


def test_greedy_batch_with_left_padding_equals_naive_decoding(tiny, last_logits):
    got = models.generate(tiny, PROMPTS, max_new_tokens=6)
    assert got == [_naive_greedy(last_logits, p, 6) for p in PROMPTS]
    assert all(len(g) == 6 for g in got)


def test_eos_stops_each_row_and_is_not_returned(tiny, last_logits):
    free = _naive_greedy(last_logits, PROMPTS[0], 6)
    eos = free[2]  # the third greedy token becomes "EOS" for row 0
    got = models.generate(tiny, PROMPTS, max_new_tokens=6, eos_id=eos)
    assert got[0] == free[: free.index(eos)]
    for prompt, row in zip(PROMPTS[1:], got[1:]):
        assert row == _naive_greedy(last_logits, prompt, 6, eos_id=eos)


def test_sampling_is_reproducible_and_respects_top_k(tiny, last_logits):
    prompt = PROMPTS[0]
    one = models.generate(tiny, [prompt], 5, temperature=1.0, top_k=1, rng=jax.random.key(3))
    assert one == [_naive_greedy(last_logits, prompt, 5)]  # top-1 sampling is greedy
    a = models.generate(tiny, [prompt] * 4, 5, temperature=1.0, rng=jax.random.key(11))
    b = models.generate(tiny, [prompt] * 4, 5, temperature=1.0, rng=jax.random.key(11))
    assert a == b
    assert len({tuple(row) for row in a}) > 1  # rows draw different samples
    allowed = set(np.argsort(last_logits(prompt))[-3:].tolist())
    first = models.generate(tiny, [prompt] * 16, 1, temperature=2.0, top_k=3, rng=jax.random.key(5))
    assert {row[0] for row in first} <= allowed


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        models.generate(tiny, [[1], []], 3)
    with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
        models.generate(tiny, [[1, 600]], 3)
    with pytest.raises(ValueError, match="top_k"):
        models.generate(tiny, [[1]], 3, temperature=1.0, top_k=0)
    assert models.generate(tiny, [[1], [2, 3]], 0) == [[], []]
