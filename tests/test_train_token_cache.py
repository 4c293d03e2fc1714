"""The token cache (train.token_cache, train.rows, train.packing): the compact layout equals dense packing, a hit
maps without tokenizing, every setting that changes the rows changes the key, a failed build publishes nothing,
one build for two processes, and data.epochs."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_resume import other_xla_flags

import models
from train import data as data_lib
from train import packing, resume, token_cache
from train.config import ConfigError, DataConfig, TrainConfig, check_ranges
from train.documents import FieldMap
from train.rows import CompactRows, RowsWriter

ROOT = Path(__file__).resolve().parents[1]
TOK = models.ByteTokenizer()
FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def _write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


def _assert_rows_equal(a, b):
    assert len(a) == len(b)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


class _Counting(models.ByteTokenizer):
    """The byte tokenizer, counting the texts it is asked to encode in batches."""

    texts = 0

    def encode_batch(self, texts, add_bos=False):
        type(self).texts += len(texts)
        return super().encode_batch(texts, add_bos=add_bos)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=2, max_value=40), min_size=1, max_size=12),
    seq_len=st.integers(min_value=3, max_value=32),
    pack=st.booleans(),
    split=st.integers(min_value=1, max_value=5),
)
def test_compact_layout_streams_the_rows_dense_packing_builds(tmp_path_factory, lengths, seq_len, pack, split):
    rng = np.random.default_rng(sum(lengths) + seq_len)
    examples = [(rng.integers(3, 60000, n), rng.random(n - 1) < 0.7) for n in lengths]
    if not pack:
        examples = [(ids[: seq_len + 1], w[:seq_len]) for ids, w in examples]
    dense = data_lib.pack_documents(
        [(ids.astype(np.int32), w.astype(np.float32)) for ids, w in examples], seq_len, pad_id=7, pack=pack
    )
    directory = str(tmp_path_factory.mktemp("layout"))
    for target in (None, directory):
        writer = RowsWriter(seq_len, np.uint16, target)
        packer = packing.Packer(seq_len, pack, writer)
        for start in range(0, len(examples), split):  # the documents arrive in chunks; rows span them
            part = examples[start : start + split]
            ids = np.concatenate([e[0] for e in part])
            trained = np.concatenate([np.concatenate([[False], e[1]]) for e in part])
            bounds = np.concatenate([[0], np.cumsum([len(e[0]) for e in part])])
            packer.add(packing.Tokenized(ids, trained, bounds, [None] * len(part), list(range(len(part))), 0))
        rows = writer.finish(pad_id=7) or CompactRows.open(directory, seq_len, 7, "uint16")
        _assert_rows_equal(rows.materialize(), dense)
        assert rows.fill == dense.fill
        order = rng.permutation(len(dense))[: min(5, len(dense))]
        for f, value in rows.take(order).items():
            np.testing.assert_array_equal(value, getattr(dense, f)[order])


def test_a_hit_maps_the_entry_without_tokenizing(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i + 1)} for i in range(30)])
    cache = str(tmp_path / "cache")
    cfg = DataConfig(seq_len=32)
    built = data_lib.load_split(_Counting(), cfg, [path], cache_dir=cache)
    assert _Counting.texts > 0 and not built.cache.hit
    _Counting.texts = 0
    hit = data_lib.load_split(_Counting(), cfg, [path], cache_dir=cache)
    assert _Counting.texts == 0 and hit.cache.hit and hit.cache.path == built.cache.path
    assert isinstance(hit.rows, CompactRows) and all(m.closed is False for m in hit.rows._maps)  # memory maps
    assert hit.rows.tokens.dtype == np.uint16 and hit.cache.fingerprint == built.cache.fingerprint
    in_memory = data_lib.load_split(TOK, cfg, [path])
    _assert_rows_equal(hit.rows.materialize(), in_memory.rows)
    assert [dataclasses.asdict(s) for s in hit.sources] == [dataclasses.asdict(s) for s in in_memory.sources]
    assert [n for n in os.listdir(cache) if not n.startswith(".")] == [os.path.basename(hit.cache.path)]
    # The content changes: a new entry with the new rows, never the stale one.
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "something else entirely"}])
    changed = data_lib.load_split(_Counting(), cfg, [path], cache_dir=cache)
    assert not changed.cache.hit and changed.cache.path != hit.cache.path and changed.tokens == 25
    assert changed.cache.fingerprint != hit.cache.fingerprint


def _key(files, tokenizer=TOK, **changes):
    cfg = DataConfig(**changes)
    return token_cache.cache_key(files, tokenizer, cfg, FieldMap.parse(cfg.fields))[0]


class _OtherEos(models.ByteTokenizer):
    eos_id = 258


def test_every_setting_that_changes_the_rows_changes_the_key(tmp_path):
    rows = [{"text": "a"}, {"prompt": "q", "completion": "c"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    base = _key([path])
    changed = {
        "seq_len": _key([path], seq_len=64),
        "pack": _key([path], pack=False),
        "add_bos": _key([path], add_bos=False),
        "add_eos": _key([path], add_eos=False),
        "loss_on_prompt": _key([path], loss_on_prompt=True),
        "skip_invalid_rows": _key([path], skip_invalid_rows=True),
        "fields": _key([path], fields=("text=body",)),
        "chat_template": _key([path], chat_template=str(template)),
        "tokenizer": _key([path], tokenizer=_OtherEos()),
    }
    template.write_text("{{ messages }}!")
    changed["chat_template content"] = _key([path], chat_template=str(template))
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text().replace('"a"', '"b"'))
    changed["content"] = _key([path])
    txt = tmp_path / "same.txt"
    txt.write_bytes((tmp_path / "d.jsonl").read_bytes())
    changed["format"] = _key([str(txt)])
    keys = list(changed.values())
    assert base not in keys and len(set(keys)) == len(keys), changed
    # What does not change the rows does not change the key: order, sizes of batches, where the file lives.
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "x.jsonl"
    moved.write_bytes((tmp_path / "d.jsonl").read_bytes())
    same = [
        _key([str(moved)]),
        _key([path], batch_size=3, seed=5, grad_accum=3, epochs=2.0, cache_dir="/elsewhere", validation_every=4),
    ]
    assert same == [changed["content"]] * 2


def test_a_failed_build_publishes_nothing_and_a_killed_one_is_cleaned_up(tmp_path):
    cache = tmp_path / "cache"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 3 + [{"text": 5}])
    with pytest.raises(data_lib.DataError, match=r"bad\.jsonl:4: field 'text' must be a string"):
        data_lib.load_split(TOK, DataConfig(), [bad], cache_dir=str(cache))
    assert [n for n in os.listdir(cache) if not n.endswith(".lock")] == []
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    name = f"good-{_key([good])[:20]}"
    (cache / f".tmp-{name}-killed").mkdir()  # what `kill -9` during a build leaves
    split = data_lib.load_split(TOK, DataConfig(), [good], cache_dir=str(cache))
    assert [n for n in os.listdir(cache) if not n.endswith(".lock")] == [name]
    assert split.cache.path == str(cache / name)
    (cache / name / "rows.bin").write_bytes(b"")  # damaged: rebuilt, not read
    again = data_lib.load_split(TOK, DataConfig(), [good], cache_dir=str(cache))
    assert not again.cache.hit and len(again.rows) == 1
    with pytest.raises(data_lib.DataError, match=r"cannot create the token cache directory .*; set data.cache_dir"):
        data_lib.load_split(TOK, DataConfig(), [good], cache_dir=good + "/cache")  # under a regular file


def test_resume_fingerprints_compare_only_like_with_like():
    saved = {"config": {}, "data_fingerprint": "a" * 64}
    with pytest.raises(resume.ResumeMismatchError, match="fingerprinted another way"):
        resume.check_same_run(saved, {}, "cache:" + "b" * 64, step=3, accept=False)
    assert (
        resume.config_diff({"data": {"epochs": 1.0, "cache_dir": ""}}, {"data": {"epochs": 2.0, "cache_dir": "x"}})
        == []
    )


def test_epochs_set_the_length_and_steps_otherwise():
    cfg = TrainConfig(data=DataConfig(batch_size=4, epochs=2.5))
    assert data_lib.steps_for_epochs(cfg, 10).steps == 7  # ceil(2.5 * 10 / 4)
    assert data_lib.steps_for_epochs(dataclasses.replace(cfg, data=DataConfig()), 10).steps == cfg.steps
    with pytest.raises(ConfigError, match="data.epochs must be a finite number >= 0"):
        check_ranges(TrainConfig(data=DataConfig(epochs=-1.0)))


# -- two processes, one build -----------------------------------------------------------------------------------------


def _worker(argv):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator")
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--cache")
    parser.add_argument("--files", nargs="+")
    args = parser.parse_args(argv)
    from train import distributed

    distributed.maybe_initialize(args.coordinator, 2, args.process_id)
    out = []
    for path in args.files:
        try:
            split = data_lib.load_split(TOK, DataConfig(seq_len=16), [path], cache_dir=args.cache)
        except data_lib.DataError as e:
            out.append({"error": str(e)})
            continue
        loader = data_lib.ResumableLoader(split.rows, batch_size=4, seed=1)
        tokens = [loader.next_batch()["tokens"].tolist() for _ in range(6)]
        out.append({"path": split.cache.path, "hit": split.cache.hit, "tokens": tokens})
    print(json.dumps(out), flush=True)


def test_two_processes_build_once_and_read_the_single_process_order(tmp_path):
    good = _write_jsonl(tmp_path / "g.jsonl", [{"text": f"row {i}: " + "xy" * i} for i in range(40)])
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"oops": 1}])
    cache = tmp_path / "cache"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {other_xla_flags()}"
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, f"--coordinator=127.0.0.1:{port}", f"--process-id={i}", f"--cache={cache}"]
            + ["--files", good, bad],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    entries = [n for n in os.listdir(cache) if not n.startswith(".")]
    assert len(entries) == 1 and first[0]["path"] == second[0]["path"] == str(cache / entries[0])
    assert not first[0]["hit"]  # process 0 built it; process 1 only mapped it
    single = data_lib.ResumableLoader(data_lib.load_split(TOK, DataConfig(seq_len=16), [good]).rows, 4, seed=1)
    want = [single.next_batch()["tokens"].tolist() for _ in range(6)]
    assert first[0]["tokens"] == second[0]["tokens"] == want
    # A bad row found by process 0 stops process 1 with the same message, at once.
    assert first[1] == second[1] and "b.jsonl:2: expected a 'text' field" in first[1]["error"]


if __name__ == "__main__":
    _worker([a for a in sys.argv[1:] if a != "--"])
