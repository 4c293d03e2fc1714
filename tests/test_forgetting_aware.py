"""Forgetting-aware fine-tuning: the retain KL measured during a run, the checkpoint selection, early stopping and
the forgetting budget, generations and trackers (JSONL, TensorBoard, W&B offline)."""

import glob
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train import cli, finetune, retain
from train.config import ConfigError, load_config
from train.export import load_checkpoint
from train.selection import EarlyStop, Evaluation, Selection

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# the rules, on known numbers


def _evals(*rows):
    return [Evaluation(step, val, kl) for step, val, kl in rows]


def test_least_forgetting_picks_the_smallest_kl_within_the_tolerance_of_the_best_validation_loss():
    history = _evals((10, 2.00, 0.1), (20, 1.04, 0.5), (30, 1.00, 0.9), (40, 1.06, 0.7))
    selection = Selection("least_forgetting", 0.05, history)
    # The band is [1.00, 1.05]: steps 20 and 30; step 40 (1.06) and 10 are outside.
    assert selection.selected.step == 20 and selection.protected() == {20, 30}
    assert Selection("best_validation", 0.05, history).selected.step == 30
    assert Selection("last", 0.05, history).selected is None
    # The base model (step 0) is never a checkpoint to select.
    assert Selection("least_forgetting", 10.0, _evals((0, 1.0, 0.0), (10, 1.0, 0.2))).selected.step == 10


def test_a_checkpoint_that_leaves_the_band_is_no_longer_protected():
    selection = Selection("least_forgetting", 0.05, _evals((10, 1.00, 0.2)))
    assert selection.protected() == {10}
    selection.add(Evaluation(20, 0.50, 0.9))  # the best falls: step 10 can never be eligible again
    assert selection.protected() == {20} and selection.selected.step == 20


def test_early_stop_on_patience_and_on_the_forgetting_budget():
    stop = EarlyStop(patience=2, max_retain_kl=0.5)
    assert stop.check(_evals((1, 3.0, 0.1), (2, 2.0, 0.2), (3, 2.1, 0.3))) is None
    assert "not improved on 2 for 2 evaluations" in stop.check(
        _evals((1, 3.0, 0.1), (2, 2.0, 0.2), (3, 2.1, 0.3), (4, 2.0, 0.3))
    )
    assert "exceeds guard.max_retain_kl=0.5" in stop.check(_evals((1, 3.0, 0.6)))
    assert EarlyStop(0, 0.0).check(_evals((1, 3.0, 9.0), (2, 4.0, 9.0))) is None


# --------------------------------------------------------------------------------------------------------------------
# the KL from the base's top-k


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 4, 16]), st.floats(0.2, 3.0))
def test_the_lumped_kl_is_a_lower_bound_that_is_exact_with_the_whole_vocabulary(seed, k, temperature):
    key1, key2 = jax.random.split(jax.random.key(seed))
    base = jax.nn.log_softmax(jax.random.normal(key1, (2, 3, 32)) / temperature)
    current = jax.nn.log_softmax(jax.random.normal(key2, (2, 3, 32)) / temperature)
    exact = np.asarray(retain.token_kl(base, current))
    top, ids = jax.lax.top_k(base, k)
    lumped = np.asarray(retain.lumped_kl(top, ids, current))
    assert np.all(lumped <= exact + 1e-5) and np.all(lumped >= -1e-6)
    whole = np.asarray(retain.lumped_kl(*jax.lax.top_k(base, 32), current))
    np.testing.assert_allclose(whole, exact, rtol=1e-3, atol=1e-5)  # float32 sums in another order


def test_the_retain_kl_is_one_program_on_a_mesh_zero_at_the_base_and_the_exact_kl_elsewhere():
    """On 8 devices (fsdp): the base's top-k and every later evaluation run one compiled program (a second would be
    a second compile of the forward pass); the KL is 0 at the base and equals the exact KL computed eagerly."""
    from train import data as data_lib
    from train import program as program_lib
    from train.validation import padded_batches

    cfg = load_config(None, ["model.source=preset:tiny", "data.seq_len=16", "data.batch_size=8"])
    model, tokenizer = program_lib.load_model(cfg.model)
    program, params, _ = program_lib.build_program(cfg, model)
    params = jax.device_put(params, program.params_shardings)
    docs = [data_lib.Document(text=f"river {i} runs past hill {i * 7} and town {i * 3}. " * 2) for i in range(9)]
    rows = data_lib.load_split(tokenizer, cfg.data, [], documents=docs).rows
    assert len(rows) % 8, "a padded last batch is part of the check"
    vocab = model.config.vocab_size  # every token "top": the lumped KL is the exact one, free of top-k ties
    evaluator = retain.RetainEvaluator(program.apply_fn, rows, 8, program.place_batch, base_params=params, top_k=vocab)
    assert evaluator(params)["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    moved = jax.tree.map(lambda x: x * 3.0, params)
    got = evaluator(moved)
    assert evaluator.programs._cache_size() == 1

    kl = tokens = 0.0
    for batch in padded_batches(rows, 8):
        log_probs = [
            jax.nn.log_softmax(program.apply_fn(p, batch["tokens"], batch["positions"], batch["segment_ids"], None))
            for p in (params, moved)
        ]
        weights = np.asarray(batch["loss_mask"] > 0, np.float64)
        kl += float(np.sum(np.asarray(retain.token_kl(*log_probs)) * weights))
        tokens += weights.sum()
    assert got["retain_kl"] > 1e-3 and got["retain_kl"] == pytest.approx(kl / tokens, rel=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# runs on the tiny model


def _retain_file(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("\n\n".join(f"Paragraph {i} about rivers, hills and the towns along them. " * 4 for i in range(10)))
    return path


def _run_overrides(tmp_path, *extra):
    return [
        f"data.train_files=[{ROOT / 'configs' / 'data' / 'chat.jsonl'}]",
        f"data.validation_files=[{ROOT / 'configs' / 'data' / 'chat_val.jsonl'}]",
        f"data.chat_template={ROOT / 'configs' / 'chatml.jinja'}",
        f"data.retain_files=[{_retain_file(tmp_path)}]",
        "data.validation_every=2",
        "progress=false",
        *extra,
    ]


def _eval_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "val_loss" in r], [r for r in lines if "generations" in r], lines


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select")
    overrides = _run_overrides(
        tmp, "steps=8", "output.select=least_forgetting", "output.select_tolerance=0.03", "checkpoint.keep=1",
        f"output.dir={tmp / 'run'}", "output.generations=1", "output.generation_tokens=4",
    )  # fmt: skip
    result = finetune.run(load_config(ROOT / "configs" / "tiny-chat.yaml", overrides))
    return {"dir": tmp / "run", "result": result}


def test_the_run_logs_the_retain_kl_and_generations_at_every_evaluation(selected_run):
    evals, generations, lines = _eval_lines(selected_run["dir"])
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
    assert evals[0]["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    assert all(r["retain_kl"] > 0 and r["retain_loss"] > 0 for r in evals[1:])
    assert [r["step"] for r in generations] == [0, 2, 4, 6, 8] and "->" in generations[0]["generations"]
    assert sum("loss" in r and "val_loss" not in r for r in lines) == 8  # one line per training step, as before


def test_the_selected_checkpoint_is_the_rules_answer_kept_and_exported(selected_run):
    run_dir = selected_run["dir"]
    evals = [r for r in _eval_lines(run_dir)[0] if r["step"] > 0]
    # The answer, computed here from the logged numbers: the smallest KL within 3% of the best validation loss.
    best = min(r["val_loss"] for r in evals)
    want = min((r for r in evals if r["val_loss"] <= best * 1.03), key=lambda r: (r["retain_kl"], r["step"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected"]["step"] == want["step"]
    assert want["step"] in summary["checkpoints"]["steps"]  # kept out of keep=1 rotation
    exported = load_checkpoint(str(run_dir), want["step"], dtype="float32").model
    from models import load

    hf_model, _ = load(f"hf:{run_dir / 'hf'}")
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) + 3
    np.testing.assert_allclose(np.asarray(hf_model(tokens)), np.asarray(exported(tokens)), atol=1e-5)
    assert (run_dir / "selection.png").read_bytes()[:4] == b"\x89PNG"


def test_the_forgetting_budget_stops_the_run_early_with_exit_0(tmp_path, capsys):
    argv = ["finetune", "--config", str(ROOT / "configs" / "tiny-chat.yaml")]
    argv += _run_overrides(tmp_path, "steps=20", "guard.max_retain_kl=1e-9", f"output.dir={tmp_path / 'run'}")
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == [0, 2] and "exceeds guard.max_retain_kl" in summary["stopped_early"]
    assert "stopped    early:" in capsys.readouterr().out
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def test_selection_settings_the_run_cannot_honour_are_refused_before_loading(tmp_path):
    base = ["steps=2", f"output.dir={tmp_path / 'run'}", "progress=false", "data.train_files=[x.txt]"]
    for extra, fragment in (
        (["output.select=least_forgetting", "data.validation_files=[v.txt]"], "set data.retain_files"),
        (["output.select=best_validation"], "set data.validation_files"),
        (["output.select=newest"], "output.select must be one of"),
        (["guard.patience=-1"], "must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            finetune.run(load_config(None, base + extra))
    assert not (tmp_path / "run").exists()


def _wandb_history(run_dir):
    """The history rows of an offline W&B run: its .wandb file is a LevelDB-style log (7-byte record headers in
    32 KiB blocks, after a 7-byte file header) of wandb's protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0]).read_bytes()
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_weights_and_biases_offline_holds_the_same_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the test extra installs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = _run_overrides(tmp_path, "steps=4", "wandb_project=finch-test", f"output.dir={tmp_path / 'run'}")
    finetune.run(load_config(ROOT / "configs" / "tiny-chat.yaml", overrides + ["checkpoint.enabled=false"]))
    rows = _wandb_history(tmp_path / "run")
    losses = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    evals = {r["_step"]: r["eval/retain_kl"] for r in rows if "eval/retain_kl" in r}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == {r["step"]: r["loss"] for r in logged if "loss" in r and "val_loss" not in r}
    assert evals == {r["step"]: pytest.approx(r["retain_kl"]) for r in logged if "retain_kl" in r}


def test_lora_runs_measure_the_exact_kl_against_their_switched_off_adapters(tmp_path):
    overrides = _run_overrides(
        tmp_path, "steps=2", "model.lora.rank=4", "optimizer.max_learning_rate=3e-2",
        "optimizer.base_learning_rate=3e-2", f"output.dir={tmp_path / 'run'}", "checkpoint.enabled=false",
    )  # fmt: skip
    result = finetune.run(load_config(ROOT / "configs" / "tiny-chat.yaml", overrides))
    evals = _eval_lines(tmp_path / "run")[0]
    assert evals[0]["retain_kl"] == pytest.approx(0.0, abs=1e-9) and evals[-1]["retain_kl"] > 0
    assert result.state.frozen is not None and jnp.all(jnp.isfinite(jnp.asarray(evals[-1]["retain_kl"])))
