"""Reading, tokenizing, packing and the resumable batch order of train.data."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from train import data as data_lib
from train.config import DataConfig, MeshConfig
from train.mesh import batch_sharding, make_mesh

TOK = models.ByteTokenizer()
ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


def test_byte_tokenizer_round_trip():
    text = "héllo, wörld — ¿qué?"
    ids = TOK.encode(text, add_bos=True)
    assert ids[0] == TOK.bos_id and all(3 <= i < 259 for i in ids[1:])
    assert TOK.decode(ids) == text


def test_read_text_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First doc\nstill first.\n\n\nSecond doc.\n")
    jl = _write_jsonl(tmp_path / "b.jsonl", [{"text": "plain"}, {"prompt": "Q?", "completion": " A."}])
    docs = data_lib.read_documents([str(txt), jl])
    assert docs == [
        data_lib.Document("First doc\nstill first.", id=f"{txt}:1"),
        data_lib.Document("Second doc.", id=f"{txt}:5"),
        data_lib.Document("plain", id=f"{jl}:1"),
        data_lib.Document(" A.", prompt="Q?", id=f"{jl}:2"),
    ]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "ok"}\n{"text": broken}\n', ":2: not valid JSON"),
        ('{"txt": "typo"}\n', ":1: expected a 'text' field, 'prompt' + 'completion' fields or a 'messages' list"),
        ('["a list"]\n', ":1: expected a JSON object"),
        ('{"prompt": "only a prompt"}\n', ":1: expected a 'text' field"),
        ('{"text": 5}\n', ":1: field 'text' must be a string"),
        ('{"text": "ok"}\n{"text": "  "}\n', ":2: field 'text' is empty"),
        ('{"prompt": "Q", "completion": ""}\n', ":1: field 'completion' is empty"),
        ('{"prompt": 1, "completion": "A"}\n', ":1: field 'prompt' must be a string"),
        ('{"messages": []}\n', ":1: field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', ":1: messages[0]: 'role' and 'content' must be"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: the conversation has no 'assistant'"),
        ("\n\n", "hold no documents"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(data_lib.DataError) as info:
        data_lib.read_documents([str(path)])
    assert fragment in str(info.value)
    if ":" in fragment[:3]:
        assert f"{path}{fragment}" in str(info.value)
        assert "data.skip_invalid_rows=true" in str(info.value)


def test_missing_unsupported_and_empty_inputs(tmp_path):
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.read_documents([str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(data_lib.DataError, match="unsupported extension"):
        data_lib.read_documents([str(tmp_path / "x.csv")])
    with pytest.raises(data_lib.DataError, match="no training files"):
        data_lib.read_documents([])
    (tmp_path / "bin.txt").write_bytes(b"fine\n\nline three \xff\xfe bad")
    with pytest.raises(data_lib.DataError, match=r"bin\.txt:3: not UTF-8 text \(byte 17 of the file\)"):
        data_lib.read_documents([str(tmp_path / "bin.txt")])
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(data_lib.DataError, match=r"bin\.jsonl:2: not UTF-8 text"):
        data_lib.read_documents([str(tmp_path / "bin.jsonl")])


def test_prompt_tokens_get_zero_weight():
    cfg = DataConfig()
    [(ids, w)] = data_lib.tokenize_documents([data_lib.Document(" AB", prompt="Q")], TOK, cfg)
    assert list(ids) == [TOK.bos_id, *TOK.encode("Q"), *TOK.encode(" AB"), TOK.eos_id]
    # targets: Q, ' ', A, B, eos -> the prompt token Q is not trained on
    assert list(w) == [0, 1, 1, 1, 1]
    [(_, w2)] = data_lib.tokenize_documents(
        [data_lib.Document(" AB", prompt="Q")], TOK, DataConfig(loss_on_prompt=True)
    )
    assert list(w2) == [1, 1, 1, 1, 1]


def test_sequence_longer_than_context_and_unpacked_long_document():
    with pytest.raises(data_lib.DataError, match="longer than the model's context of 64"):
        data_lib.load_split(TOK, DataConfig(seq_len=128), (), max_context=64, documents=[data_lib.Document("x")])
    long = data_lib.tokenize_documents([data_lib.Document("y" * 50)], TOK, DataConfig())
    with pytest.raises(data_lib.DataError, match="more than data.seq_len=16"):
        data_lib.pack_documents(long, seq_len=16, pad_id=0, pack=False)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=2, max_value=40), min_size=1, max_size=12),
    seq_len=st.integers(min_value=4, max_value=32),
)
def test_packing_keeps_every_target_once_and_never_crosses_documents(lengths, seq_len):
    rng = np.random.default_rng(sum(lengths) + seq_len)
    examples = [(rng.integers(3, 200, n).astype(np.int32), rng.random(n - 1).astype(np.float32)) for n in lengths]
    rows = data_lib.pack_documents(examples, seq_len=seq_len, pad_id=0)
    valid = rows.segment_ids > 0
    # every (input, target, weight) transition of every document appears exactly once
    assert valid.sum() == sum(n - 1 for n in lengths)
    got = sorted(zip(rows.tokens[valid].tolist(), rows.targets[valid].tolist(), rows.loss_mask[valid].tolist()))
    want = sorted((int(a), int(b), float(w)) for ids, ws in examples for a, b, w in zip(ids[:-1], ids[1:], ws))
    assert got == want
    # padding carries no loss; positions restart at 0 in each segment and count up by one
    assert np.all(rows.loss_mask[~valid] == 0)
    for r in range(len(rows)):
        for s in set(rows.segment_ids[r][valid[r]].tolist()):
            pos = rows.positions[r][rows.segment_ids[r] == s]
            assert list(pos) == list(range(len(pos)))
        # inside a segment, each target is the next input (no cross-document prediction)
        for t in range(seq_len - 1):
            if valid[r, t] and rows.segment_ids[r, t] == rows.segment_ids[r, t + 1]:
                assert rows.targets[r, t] == rows.tokens[r, t + 1]


def _rows(n=10, seq_len=4):
    tokens = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    z = np.zeros_like(tokens)
    return data_lib.PackedRows(tokens, tokens + 1, np.ones(tokens.shape, np.float32), z, z + 1)


def test_loader_order_is_deterministic_covers_each_epoch_and_resumes():
    rows = _rows()
    a = data_lib.ResumableLoader(rows, batch_size=4, seed=3)
    batches = [a.next_batch()["tokens"][:, 0] // 4 for _ in range(5)]  # 20 rows = 2 epochs
    seen = np.concatenate(batches)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a fresh permutation per epoch
    # same seed -> same order; resuming from a saved position replays the rest exactly
    b = data_lib.ResumableLoader(rows, batch_size=4, seed=3)
    b.next_batch()
    b.next_batch()
    saved = b.state_dict()
    c = data_lib.ResumableLoader(rows, batch_size=4, seed=3)
    c.load_state_dict(saved)
    for want in batches[2:]:
        np.testing.assert_array_equal(c.next_batch()["tokens"][:, 0] // 4, want)
    other = data_lib.ResumableLoader(rows, batch_size=4, seed=4)
    assert not np.array_equal(other.next_batch()["tokens"][:, 0] // 4, batches[0])
    with pytest.raises(data_lib.DataError, match="saw 99 packed rows"):
        c.load_state_dict({"rows_consumed": 4, "num_rows": 99})


def test_local_rows_cover_the_batch_across_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rows = data_lib.local_rows(batch_sharding(mesh), (8, 16))
    assert list(rows) == list(range(8))  # one process holds every device
    assert jax.process_count() == 1


CHATML = (ROOT / "configs" / "chatml.jinja").read_text()


def _trained_text(ids, weights):
    """The text of the tokens trained on (targets ids[1:] with weight > 0), runs joined by '|'."""
    runs, current = [], []
    for token, w in zip(ids[1:], weights):
        if w > 0:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return "|".join(TOK.decode(run) for run in runs)


def test_chat_rows_train_on_assistant_replies_only(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A model."},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    cfg = DataConfig(chat_template=str(template), seq_len=256)
    docs = data_lib.read_documents([path])
    assert docs[0].messages == tuple(chat) and docs[0].id == f"{path}:1"
    [(ids, w)] = data_lib.tokenize_documents(docs, TOK, cfg)
    # The rendering is the whole row: no BOS/EOS added around a chat (the template places its own).
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    assert list(ids) == TOK.encode(rendered)
    assert _trained_text(ids, w) == "Hello!<|im_end|>\n|A model.<|im_end|>\n"
    [(_, everything)] = data_lib.tokenize_documents(docs, TOK, dataclasses.replace(cfg, loss_on_prompt=True))
    assert everything.all()


def test_chat_without_a_template_names_the_setting(tmp_path):
    path = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(data_lib.DataError, match=r"c\.jsonl:1: a chat \('messages'\) row, but the model has no chat"):
        data_lib.load_split(TOK, DataConfig(), [path])
    with pytest.raises(data_lib.DataError, match="data.chat_template file '/nope.jinja' does not exist"):
        data_lib.load_split(TOK, DataConfig(chat_template="/nope.jinja"), [path])


def test_rows_longer_than_seq_len_are_errors_or_skipped_never_cut(tmp_path):
    rows = [
        {"prompt": "Q" * 10, "completion": "A" * 10},
        {"prompt": "Q" * 40, "completion": "A" * 40},  # 82 tokens with BOS/EOS: too long for seq_len 32
        {"text": "T" * 100},  # plain text is split into consecutive rows
        {"text": ""},
        {"nothing": 1},
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data_lib.DataError, match=r"d\.jsonl:4: field 'text' is empty"):
        data_lib.load_split(TOK, DataConfig(seq_len=32), [path])
    split = data_lib.load_split(TOK, DataConfig(seq_len=32, skip_invalid_rows=True), [path])
    [stats] = split.sources
    assert (stats.documents, stats.skipped) == (2, 3)
    assert dict(split.issues.counts) == {"longer than seq_len": 1, "empty text": 1, "unknown format": 1}
    assert split.issues.describe().startswith("3 rows skipped (")
    assert stats.tokens == 22 + 102 and stats.trained_tokens == 11 + 101
    assert split.rows.loss_mask.sum() == stats.trained_tokens  # nothing trained was lost to packing
    good = _write_jsonl(tmp_path / "good.jsonl", rows[1:2])
    with pytest.raises(data_lib.DataError, match=r"good\.jsonl:1: this prompt/completion row has 82 tokens, more than"):
        data_lib.load_split(TOK, DataConfig(seq_len=32), [good])


class _CountingTokenizer(models.ByteTokenizer):
    """The byte tokenizer, counting how often it is asked to encode."""

    calls = 0

    def encode_batch(self, texts, add_bos=False):
        type(self).calls += 1
        return super().encode_batch(texts, add_bos=add_bos)


def test_each_file_is_tokenized_in_one_batch_and_counted(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(50)])
    b = tmp_path / "b.txt"
    b.write_text("one\n\ntwo\n\nthree\n")
    tok = _CountingTokenizer()
    split = data_lib.load_split(tok, DataConfig(seq_len=16), [a, str(b)])
    assert _CountingTokenizer.calls == 2  # one call per file, whatever its number of rows
    assert [(s.name, s.documents) for s in split.sources] == [(a, 50), (str(b), 3)]
    assert split.documents == 53 and split.tokens == sum(s.tokens for s in split.sources)
    with pytest.raises(data_lib.DataError, match="no validation files given"):
        data_lib.load_split(tok, DataConfig(), [], what="validation")
    with pytest.raises(data_lib.DataError, match="validation file '/x.jsonl' does not exist"):
        data_lib.load_split(tok, DataConfig(), ["/x.jsonl"], what="validation")
