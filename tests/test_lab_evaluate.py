"""Eval rows (through train.data's tokenize/pack path), eval sets larger than their data, and the eval CLI."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from models import ByteTokenizer
from train.lab import evaluate, tasks
from train.lab.evaluate import EvalConfig, build_eval_set

prepare_cache = runpy.run_path(str(Path(__file__).parent / "fixtures/lab/builders.py"))["prepare_cache"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_cache(tmp_path_factory.mktemp("lab-eval"), ("austen", "brown", "quiz"))


def _ids(text):
    return ByteTokenizer().encode(text)


def test_pair_rows_weigh_the_completion_and_cut_long_prompts():
    tok = ByteTokenizer()
    rows = evaluate.pair_rows(tok, [("ab", " c")], 8, "t")
    ids = [tok.bos_id, *_ids("ab c")]
    assert rows.tokens[0].tolist() == ids[:-1] + [tok.pad_id] * 4
    assert rows.targets[0, :4].tolist() == ids[1:]
    assert rows.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert rows.segment_ids[0].tolist() == [1] * 4 + [0] * 4 and rows.positions[0, :4].tolist() == [0, 1, 2, 3]
    cut = evaluate.pair_rows(tok, [("ab", " c")], 3, "t")  # the prompt loses its start, never the completion
    assert cut.tokens[0].tolist() == _ids("ab ") and cut.targets[0].tolist() == _ids("b c")
    assert cut.loss_mask[0].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="does not fit seq_len=1"):
        evaluate.pair_rows(tok, [("ab", " c")], 1, "t")
    with pytest.raises(ValueError, match="empty completion"):
        evaluate.pair_rows(tok, [("ab", "")], 8, "t")


def test_text_rows_take_windows_round_robin():
    tok = ByteTokenizer()
    rows = evaluate.text_rows(tok, ["abcdefg", "xy"], 3, 4, seed=0, what="t")
    firsts = sorted(rows.tokens[:2].tolist())
    assert firsts == sorted([[tok.bos_id, *_ids("abc")], [tok.bos_id, *_ids("x"), tok.pad_id, tok.pad_id]])
    assert rows.tokens[2].tolist() == [*_ids("def")] + [tok.pad_id]  # second window of the long document
    assert rows.targets[2, :3].tolist() == _ids("efg")
    np.testing.assert_array_equal(rows.loss_mask[2], [1, 1, 1, 0])
    with pytest.raises(ValueError, match="has only 3"):
        evaluate.text_rows(tok, ["abcdefg", "xy"], 4, 4, seed=0, what="t")


def test_eval_set_larger_than_data_is_an_error(cache):
    tok = ByteTokenizer()
    retain = tasks.load_retain(cache)
    with pytest.raises(ValueError, match="retain: asked for 500 windows"):
        build_eval_set(tok, EvalConfig(seq_len=64, retain_sequences=500, quiz_items=0), retain_texts=retain)
    facts = tasks.load_task("facts", cache, num_entities=2)
    with pytest.raises(ValueError, match="only 12 held-out pairs"):
        build_eval_set(tok, EvalConfig(task_examples=13), task=facts)
    es = build_eval_set(tok, EvalConfig(seq_len=32, retain_sequences=4, quiz_items=0), retain_texts=retain)
    assert es.retain.tokens.shape == (4, 32)
    # Round-robin: the first windows come from different documents (each starts with bos).
    assert (es.retain.tokens[:, 0] == tok.bos_id).sum() >= 2


def test_eval_cli(cache, tmp_path):
    out = tmp_path / "m.json"
    code = evaluate.main(
        [
            "--model",
            "preset:tiny",
            "--base",
            "preset:tiny",
            "--task",
            "facts",
            "--facts-entities",
            "2",
            "--cache-dir",
            str(cache),
            "--seq-len",
            "48",
            "--retain-sequences",
            "2",
            "--quiz-items",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["sizes"] == {"task_rows": 12, "retain_rows": 2, "quiz_items": 4}
    assert report["metrics"]["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the same model as its base
    assert set(report["forgetting"]) >= {"retain_loss", "retain_kl", "mc_acc"}
    assert evaluate.main(["--model", "preset:tiny", "--task", "facts", "--cache-dir", str(tmp_path / "none")]) == 2
