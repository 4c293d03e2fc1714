"""Every input format (train.readers) gives the rows JSONL gives, names its bad rows by file:line or file:row, and
the data.fields column map (text=COLUMN, alpaca, sharegpt)."""

import gzip
import json

import numpy as np
import pytest

import models
from train import data as data_lib
from train.config import DataConfig
from train.documents import FieldMap, RowIssues

TOK = models.ByteTokenizer()
ROWS = [
    {"text": "A plain document about finches."},
    {"prompt": "Q: what eats seeds?\nA:", "completion": " finches"},
    {"text": "Another one, a little longer than the first, to fill a second row."},
]
BAD = {"prompt": "Q", "completion": 7}  # a mistyped field


def _write(path, rows):
    """``rows`` in the format ``path``'s extension names (a directory: datasets' save_to_disk)."""
    import pyarrow as pa

    path = str(path)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.endswith(".jsonl"):
        open(path, "wb").write(lines)
    elif path.endswith(".jsonl.gz"):
        open(path, "wb").write(gzip.compress(lines))
    elif path.endswith(".jsonl.zst"):
        import zstandard

        open(path, "wb").write(zstandard.ZstdCompressor().compress(lines))
    else:
        # Tables hold every column; a row leaves the ones of other formats null (mixed row kinds).
        names = sorted({k for r in rows for k in r})
        table = pa.table({n: [r.get(n) for r in rows] for n in names})
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            pq.write_table(table, path, row_group_size=2)
        elif path.endswith(".arrow"):
            with pa.ipc.new_stream(path, table.schema) as w:  # datasets' own .arrow files are streams
                w.write_table(table, max_chunksize=2)
        else:
            import datasets

            datasets.Dataset(table).save_to_disk(path)
    return path


FORMATS = [("d.jsonl", "{}:{}", 1), ("d.jsonl.gz", "{}:{}", 1), ("d.jsonl.zst", "{}:{}", 1)]
FORMATS += [("d.parquet", "{}:row {}", 0), ("d.arrow", "{}:row {}", 0), ("d_dataset", "{}:row {}", 0)]


@pytest.mark.parametrize("name, where, base", FORMATS, ids=[f[0] for f in FORMATS])
def test_each_format_gives_the_jsonl_rows_and_names_its_bad_rows(tmp_path, name, where, base):
    cfg = DataConfig(seq_len=48)
    want = data_lib.load_split(TOK, cfg, [_write(tmp_path / "ref.jsonl", ROWS)])
    path = _write(tmp_path / name, ROWS)
    got = data_lib.load_split(TOK, cfg, [path], cache_dir=str(tmp_path / "cache"))
    for f in ("tokens", "targets", "loss_mask", "positions", "segment_ids"):
        np.testing.assert_array_equal(getattr(got.rows.materialize(), f), getattr(want.rows, f), err_msg=f)
    assert (got.documents, got.tokens, got.trained_tokens) == (want.documents, want.tokens, want.trained_tokens)
    docs = data_lib.read_file(path, RowIssues())
    assert docs[1].id == where.format(path, base + 1) and docs[1].prompt == ROWS[1]["prompt"]
    bad = _write(tmp_path / ("bad_" + name), [ROWS[0], ROWS[2], BAD])
    with pytest.raises(data_lib.DataError) as info:
        data_lib.load_split(TOK, cfg, [bad], cache_dir=str(tmp_path / "cache"))
    assert f"{where.format(bad, base + 2)}: field 'completion' must be a string, got int" in str(info.value)
    skipped = data_lib.load_split(TOK, DataConfig(seq_len=48, skip_invalid_rows=True), [bad])
    assert skipped.documents == 2 and dict(skipped.issues.counts) == {"wrong type": 1}


def test_unreadable_inputs_are_errors_not_tracebacks(tmp_path):
    import datasets

    cases = {
        "x.jsonl.gz": (b"not gzip at all", r"x\.jsonl\.gz:1: cannot decompress"),
        "x.jsonl.zst": (b"not zstd at all", r"x\.jsonl\.zst:1: cannot decompress"),
        "x.parquet": (b"PAR1 nope", r"not a readable parquet file"),
        "x.arrow": (b"nope", r"not an Arrow IPC file or stream"),
        "x.csv": (b"a,b\n", r"unsupported extension \(use \.txt, \.jsonl, \.jsonl\.gz"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data_lib.DataError, match=message):
            data_lib.load_split(TOK, DataConfig(), [str(tmp_path / name)])
    table = _write(tmp_path / "cols.parquet", [{"body": "x"}])
    with pytest.raises(data_lib.DataError, match=r"no column holds documents: it has \['body'\].*data\.fields"):
        data_lib.load_split(TOK, DataConfig(), [table])
    splits = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(splits))
    with pytest.raises(data_lib.DataError, match=r"DatasetDict with splits \['train'\]: name one .*dict/train"):
        data_lib.load_split(TOK, DataConfig(), [str(splits)])
    (tmp_path / "plain").mkdir()
    with pytest.raises(data_lib.DataError, match="is a directory but not a datasets save_to_disk directory"):
        data_lib.load_split(TOK, DataConfig(), [str(tmp_path / "plain")])


def test_field_map_alpaca_sharegpt_and_renamed_text(tmp_path):
    alpaca = _write(
        tmp_path / "a.parquet",
        [
            {"instruction": "Name a finch.", "input": "", "output": "The zebra finch."},
            {"instruction": "Translate:", "input": "pinson", "output": "finch"},
        ],
    )
    docs = data_lib.read_file(alpaca, RowIssues(), fields=FieldMap.parse(["alpaca"]))
    assert [(d.prompt, d.text) for d in docs] == [
        ("Name a finch.", "The zebra finch."),
        ("Translate:\n\npinson", "finch"),
    ]
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hey"},
    ]
    sharegpt = _write(tmp_path / "s.jsonl", [{"conversations": turns}, {"conversations": turns[:2]}])
    issues = RowIssues(skip=True)
    [chat] = data_lib.read_file(sharegpt, issues, fields=FieldMap.parse(["sharegpt"]))
    assert [(m["role"], m["content"]) for m in chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hey"),
    ]
    assert issues.first == f"{sharegpt}:2: the conversation has no 'assistant' message to train on"
    body = _write(tmp_path / "b.jsonl", [{"body": "renamed", "text": "ignored"}, {"title": "x"}])
    with pytest.raises(data_lib.DataError, match=r"b\.jsonl:2: expected a 'body' field, 'prompt' \+ 'completion'"):
        data_lib.read_file(body, RowIssues(), fields=FieldMap.parse(["text=body"]))
    split = data_lib.load_split(TOK, DataConfig(fields=("text=body",), skip_invalid_rows=True), [body])
    assert split.documents == 1 and split.tokens == len("renamed") + 2
    for entry, message in [("txt=body", "TARGET=COLUMN"), ("messages=a+b", "messages come from one column")]:
        with pytest.raises(data_lib.DataError, match=message):
            FieldMap.parse([entry])
