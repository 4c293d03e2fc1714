"""Reading, tokenizing, packing and the resumable batch order of train.data."""

import json

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
        data_lib.Document("First doc\nstill first."),
        data_lib.Document("Second doc."),
        data_lib.Document("plain"),
        data_lib.Document(" A.", prompt="Q?"),
    ]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"text": "ok"}\n{"text": broken}\n', ":2: not valid JSON"),
        ('{"txt": "typo"}\n', ":1: expected a 'text' field or 'prompt' + 'completion'"),
        ('["a list"]\n', ":1: expected a JSON object"),
        ('{"prompt": "only a prompt"}\n', ":1: expected a 'text' field"),
        ('{"text": 5}\n', "field 'text' must be a string"),
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
        assert str(path) in str(info.value)


def test_missing_unsupported_and_empty_inputs(tmp_path):
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.read_documents([str(tmp_path / "missing.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(data_lib.DataError, match="unsupported extension"):
        data_lib.read_documents([str(tmp_path / "x.csv")])
    with pytest.raises(data_lib.DataError, match="no training files"):
        data_lib.read_documents([])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(data_lib.DataError, match="not UTF-8"):
        data_lib.read_documents([str(tmp_path / "bin.txt")])


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
        data_lib.build_rows(TOK, DataConfig(seq_len=128), max_context=64, documents=[data_lib.Document("x")])
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
