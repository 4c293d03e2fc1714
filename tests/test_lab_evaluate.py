"""Eval rows (random retain windows, packed prompt/completion pairs), the Evaluator against direct scoring, halves
A/B, eval sets larger than their data, and the eval CLI."""

import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import ByteTokenizer
from train.lab import evalsets, evaluate, tasks
from train.lab.evalsets import EvalConfig, build_eval_set
from train.step import split_model

prepare_cache = runpy.run_path(str(Path(__file__).parent / "fixtures/lab/builders.py"))["prepare_cache"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_cache(tmp_path_factory.mktemp("lab-eval"), ("austen", "brown", "quiz"))


@pytest.fixture(scope="module")
def tiny():
    model, tok = models.load("preset:tiny")
    apply_fn, params, _ = split_model(model)
    return apply_fn, params, tok


def _ids(text):
    return ByteTokenizer().encode(text)


def test_pair_rows_pack_examples_weigh_the_completion_and_cut_long_prompts():
    tok = ByteTokenizer()
    er = evalsets.pair_rows(tok, [("ab", " c"), ("xy", " zw")], 16, "t")
    ids0, ids1 = [tok.bos_id, *_ids("ab c")], [tok.bos_id, *_ids("xy zw")]
    assert len(er) == 1 and er.num_examples == 2  # both pairs share one row, each its own segment
    row = er.rows
    assert row.tokens[0, :9].tolist() == ids0[:-1] + ids1[:-1]
    assert row.segment_ids[0].tolist() == [1] * 4 + [2] * 5 + [0] * 7
    assert row.positions[0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert row.loss_mask[0, :9].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert er.example[0].tolist() == [0] * 4 + [1] * 5 + [-1] * 7
    assert er.per_example(row.loss_mask).tolist() == [2.0, 3.0]
    cut = evalsets.pair_rows(tok, [("ab", " c")], 3, "t")  # the prompt loses its start, never the completion
    assert cut.rows.tokens[0].tolist() == _ids("ab ") and cut.rows.targets[0].tolist() == _ids("b c")
    assert cut.rows.loss_mask[0].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="does not fit seq_len=1"):
        evalsets.pair_rows(tok, [("ab", " c")], 1, "t")
    with pytest.raises(ValueError, match="empty completion"):
        evalsets.pair_rows(tok, [("ab", "")], 8, "t")


def test_random_windows_are_disjoint_random_and_seeded():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    texts = ["".join(chr(97 + c) for c in rng.integers(0, 26, 400)) for _ in range(3)]  # every 17-gram unique
    er = evalsets.random_windows(tok, texts, 12, 16, seed=0, what="t")
    again = evalsets.random_windows(tok, texts, 12, 16, seed=0, what="t")
    other = evalsets.random_windows(tok, texts, 12, 16, seed=1, what="t")
    assert er.rows.tokens.shape == (12, 16) and er.num_examples == 12
    np.testing.assert_array_equal(er.rows.tokens, again.rows.tokens)
    assert not np.array_equal(er.rows.tokens, other.rows.tokens)
    assert er.rows.loss_mask.sum() == 12 * 16 and (er.rows.tokens != tok.bos_id).all()  # no BOS: mid-text windows
    # Each window is a contiguous slice of one document, found at a random offset; windows never overlap.
    spans = []
    for tokens, targets in zip(er.rows.tokens, er.rows.targets):
        text = bytes(list(tokens) + [targets[-1]]).decode()
        doc = next(i for i, t in enumerate(texts) if text in t)
        start = texts[doc].index(text)
        spans.append((doc, start))
    assert len({s for _, s in spans}) > 3 and any(s > 0 for _, s in spans)
    for i, (d1, s1) in enumerate(spans):
        for d2, s2 in spans[i + 1 :]:
            assert d1 != d2 or abs(s1 - s2) >= 16
    with pytest.raises(ValueError, match="cannot hold"):
        evalsets.random_windows(tok, texts, 200, 16, seed=0, what="retain")


def test_evaluator_matches_scoring_each_example_alone(tiny, cache):
    apply_fn, params, tok = tiny
    task = tasks.load_task("facts", cache, num_entities=2)
    es = build_eval_set(tok, EvalConfig(seq_len=192, batch_size=4, retain_sequences=0, quiz_items=0), task=task)
    assert len(es.task) < es.task.num_examples == 12  # packed several to a row
    got = evaluate.Evaluator(apply_fn, es).evaluate(params).metrics["task_loss"]
    # Each example alone in its own row, padded to one length (one compilation), scored directly.
    forward = jax.jit(lambda t, s: jax.nn.log_softmax(apply_fn(params, t, jnp.arange(191)[None], s)[0], axis=-1))
    nll = count = 0.0
    for prompt, completion in task.eval_pairs:
        ids = [tok.bos_id, *tok.encode(prompt), *tok.encode(completion)]
        n, n_completion = len(ids) - 1, len(tok.encode(completion))
        tokens = np.zeros((1, 191), np.int32)
        tokens[0, :n] = ids[:-1]
        log_probs = forward(jnp.asarray(tokens), jnp.asarray((np.arange(191) < n)[None].astype(np.int32)))
        token_lp = np.asarray(log_probs)[np.arange(n), ids[1:]]
        nll -= float(token_lp[-n_completion:].sum())
        count += n_completion
    assert got == pytest.approx(nll / count, rel=1e-5)


def test_evaluator_kl_halves_and_quiz(tiny, cache):
    apply_fn, params, tok = tiny
    es = build_eval_set(
        tok,
        EvalConfig(seq_len=32, batch_size=4, retain_sequences=6, quiz_items=8),
        retain_texts=tasks.load_retain("builtin", cache),
        quiz_items=tasks.load_quiz_items(8, cache_dir=cache),
    )
    ev = evaluate.Evaluator(apply_fn, es, base_params=params)
    same = ev.evaluate(params)
    assert same.metrics["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"mc_acc", "mc_ece", "mc_brier"} <= set(same.metrics)
    moved = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    result = ev.evaluate(moved, quiz=False)
    m = result.metrics
    assert "mc_acc" not in m and m["retain_kl"] > 0
    half_a, half_b = es.retain_halves
    assert half_a.tolist() == [0, 2, 4] and half_b.tolist() == [1, 3, 5]
    # The halves are disjoint window sets whose token-weighted mean is the whole.
    assert m["retain_kl"] == pytest.approx((m["retain_kl_A"] * 3 + m["retain_kl_B"] * 3) / 6, rel=1e-6)
    assert len(result.record()["retain_kl_sums"]) == 6


def test_eval_set_larger_than_data_is_an_error(cache):
    tok = ByteTokenizer()
    retain = tasks.load_retain("builtin", cache)
    with pytest.raises(ValueError, match="retain: asked for 5000 windows"):
        build_eval_set(tok, EvalConfig(seq_len=64, retain_sequences=5000, quiz_items=0), retain_texts=retain)
    facts = tasks.load_task("facts", cache, num_entities=2)
    with pytest.raises(ValueError, match="only 12 held-out pairs"):
        build_eval_set(tok, EvalConfig(task_examples=13), task=facts)
    with pytest.raises(ValueError, match="retain_sequences must be 0 or >= 2"):
        EvalConfig(retain_sequences=1)


def test_eval_cli(cache, tmp_path):
    out = tmp_path / "m.json"
    retain = tmp_path / "retain.txt"
    retain.write_text("\n\n".join(f"Some plain English text about the weather number {i}. " * 8 for i in range(6)))
    args = ["--model", "preset:tiny", "--base", "preset:tiny", "--task", "facts", "--facts-entities", "2"]
    args += ["--cache-dir", str(cache), "--seq-len", "48", "--quiz-items", "0", "--out", str(out)]
    code = evaluate.main([*args, "--retain", f"file:{retain}", "--retain-sequences", "4"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["sizes"] == {"task_examples": 12, "retain_windows": 4, "quiz_items": 0}
    assert report["metrics"]["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the same model as its base
    assert set(report["forgetting"]) >= {"retain_loss", "retain_kl"}
    assert evaluate.main(["--model", "preset:tiny", "--task", "facts", "--cache-dir", str(tmp_path / "none")]) == 2
    assert evaluate.main([*args, "--retain", f"file:{tmp_path / 'missing.txt'}"]) == 2
