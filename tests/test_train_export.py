"""A finetune as a new user runs it, on the tiny model and chat data: the run folder it writes by default, what it
prints, validation lines, the Hugging Face export transformers loads with our logits, `export` from any
checkpoint, resume, `--help` / `--print-config`, and bad data failing without touching the folder."""

import contextlib
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file

import models
from train import cli
from train import config as config_lib
from train.chat_template import ChatTemplate
from train.export import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "configs" / "data" / "chat.jsonl"
CHAT_VAL = ROOT / "configs" / "data" / "chat_val.jsonl"
CHATML = ROOT / "configs" / "chatml.jinja"


def _snapshot(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def _listing(directory):
    """Names in ``directory``, without hidden ones (the run lock)."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def _argv(steps=4):
    return [
        "finetune",
        "--config",
        str(ROOT / "configs" / "tiny-chat.yaml"),
        f"data.train_files=[{CHAT}]",
        f"data.validation_files=[{CHAT_VAL}]",
        f"data.chat_template={CHATML}",
        "data.validation_every=2",
        f"steps={steps}",
        "output.hf_every=2",
        "checkpoint.every=2",
        "progress=false",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`finch-train finetune --config configs/tiny-chat.yaml ...` from an empty working directory."""
    cwd = tmp_path_factory.mktemp("user")
    capture = cwd / "stdout.txt"
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with open(capture, "w") as out:
            with contextlib.redirect_stdout(out):
                assert cli.main(_argv()) == 0
    finally:
        os.chdir(old)
    return {"cwd": cwd, "dir": cwd / "runs" / "tiny-chat", "stdout": capture.read_text()}


def test_default_run_folder_holds_everything_and_the_summaries_say_so(run):
    run_dir, out = run["dir"], run["stdout"]
    assert _listing(run_dir) == [
        "checkpoints",
        "config.yaml",
        "hf",
        "hf-step-2",
        "metrics.jsonl",
        "summary.json",
        "tensorboard",
    ]
    assert _listing(run_dir / "checkpoints") == ["2", "4"]
    for expected in [
        "WARNING: model.source=preset:tiny is a randomly initialised model",
        "model      preset:tiny: 106.8k parameters (106,816), stored float32, computed in float32",
        "tensor=1 on 8 cpu devices: batch rows split over 8 data-parallel devices; params and optimizer state",
        f"data       {CHAT}: 36 documents, 7,196 tokens (2,708 trained)",
        f"validation {CHAT_VAL}: 12 documents",
        f"chats rendered with {CHATML}; loss on assistant replies only",
        "steps      4 x 8 rows x 384 tokens = 3,072 tokens per step",
        "optimizer  finch_adamw: max_learning_rate 0.003, base_learning_rate 0.003",
        "output     runs/tiny-chat/",
        "checkpoints runs/tiny-chat/checkpoints (every 2 steps and every 10 min of training and at the end, keep 3; "
        "a crash loses at most ~10 min of training)",
        "Hugging Face model runs/tiny-chat/hf at the end, and hf-step-N every 2 steps (float32)",
        "resume     none: starting at step 0",
        "done       steps 0 -> 4 in",
        "checkpoint runs/tiny-chat/checkpoints (steps 2, 4)",
        "next       finch-train chat runs/tiny-chat/hf",
    ]:
        assert expected in out, f"{expected!r} not in:\n{out}"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    validation = [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]
    assert [s for s, _ in validation] == [0, 2, 4] and validation[-1][1] < validation[0][1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["hf"] == "runs/tiny-chat/hf" and summary["steps"] == [0, 4]
    assert [v["loss"] for v in summary["validation"]] == [v for _, v in validation]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["output"]["dir"] == "runs/tiny-chat"
    assert saved["checkpoint"]["directory"] == "runs/tiny-chat/checkpoints"


@pytest.mark.torch
def test_export_loads_in_transformers_with_our_logits_tokens_and_chat_template(run):
    hf_dir = run["dir"] / "hf"
    ours = load_checkpoint(str(run["dir"]), dtype="float32")
    assert ours.step == 4
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = [json.loads(line)["messages"] for line in CHAT_VAL.read_text().splitlines()[:2]]
    template = ChatTemplate(CHATML.read_text())
    texts = [template.render(m, add_generation_prompt=True) for m in messages]
    assert [hf_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages] == texts
    ids = [ours.tokenizer.encode(t) for t in texts]
    assert [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts] == ids
    length = min(map(len, ids))
    tokens = np.asarray([i[:length] for i in ids], np.int32)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    diff = np.abs(np.asarray(ours.model(tokens)) - theirs).max()
    print(f"\n[export] tiny fine-tuned: max |logit diff| ours vs transformers = {diff:.2e}")
    assert diff < 1e-4
    # models.load reads the export back bit for bit.
    reloaded, tokenizer = models.load(f"hf:{hf_dir}")
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)), np.asarray(ours.model(tokens)))
    assert tokenizer.chat_template == CHATML.read_text()


def test_export_command_writes_any_step(run, tmp_path, capsys):
    assert cli.main(["export", str(run["dir"]), "--step", "2", "--out", str(tmp_path / "two")]) == 0
    assert "exported step 2" in capsys.readouterr().out
    assert cli.main(["export", str(run["dir"] / "checkpoints"), "--out", str(tmp_path / "last")]) == 0
    for exported, written_in_training in (("two", "hf-step-2"), ("last", "hf")):
        a = load_file(tmp_path / exported / "model.safetensors")
        b = load_file(run["dir"] / written_in_training / "model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert (tmp_path / exported / "tokenizer_config.json").read_text() == (
            run["dir"] / written_in_training / "tokenizer_config.json"
        ).read_text()
    assert cli.main(["export", str(tmp_path / "nothing-here")]) == 2
    assert "neither a run folder nor a checkpoint directory" in capsys.readouterr().err


def test_resume_says_where_it_starts(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run["dir"], copy)
    assert cli.main(_argv(steps=6) + [f"output.dir={copy}"]) == 0
    out = capsys.readouterr().out
    assert "resume     from step 4 of 6" in out and "done       steps 4 -> 6" in out
    assert _listing(copy / "checkpoints") == ["2", "4", "6"]


def test_bad_rows_fail_before_training_and_leave_the_run_folder_alone(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run["dir"], copy)
    before = _snapshot(copy)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHAT.read_text() + '{"messages": [{"role": "user", "content": "no reply"}]}\n')
    assert cli.main(_argv(steps=6) + [f"output.dir={copy}", f"data.train_files=[{bad}]"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:37: the conversation has no 'assistant' message" in err
    assert _snapshot(copy) == before


def test_help_lists_every_key_and_print_config_shows_the_run_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for key, kind, default, meaning in config_lib.key_table():
        assert meaning, f"config key {key} has no line in its dataclass's Attributes: docstring section"
        assert any(line.split()[:3] == [key, kind, default] for line in help_text.splitlines()), key
    assert cli.main(["finetune", "model.source=gguf:smollm2", f"data.train_files=[{CHAT}]", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"]["dir"] == "runs/smollm2-chat"
    assert printed["checkpoint"]["directory"] == "runs/smollm2-chat/checkpoints"
    assert config_lib.from_dict(printed).model.source == "gguf:smollm2"


@pytest.mark.torch
def test_sharded_export_loads_in_transformers_check_export_generate_and_chat(run, tmp_path, capsys, monkeypatch):
    """`export --max-shard-size` splits the weights as transformers does; every reader of exports still loads it."""
    out = tmp_path / "sharded"
    assert cli.main(["export", str(run["dir"]), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert f"in {len(shards)} shards" in capsys.readouterr().out
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    single = load_file(run["dir"] / "hf" / "model.safetensors")  # the same step, exported in one file
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
    for shard in shards:
        tensors = load_file(out / shard)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 100_000
        assert all(np.array_equal(t, single[name]) for name, t in tensors.items())
    assert sorted(index["weight_map"]) == sorted(single)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = [
            transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()(tokens).logits.numpy()
            for d in (out, run["dir"] / "hf")
        ]
    np.testing.assert_array_equal(logits[0], logits[1])
    check_export = runpy.run_path(str(ROOT / "scripts" / "check_export.py"))
    assert check_export["main"]([str(out), "--message", "Hi"]) == 0
    assert "  OK" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert cli.main(["chat", str(out), "--max-new-tokens", "2"]) == 0
    # A bad size is refused before the checkpoint is read.
    assert cli.main(["export", str(run["dir"]), "--out", str(tmp_path / "bad"), "--max-shard-size", "5 parsecs"]) == 2
    assert "--max-shard-size='5 parsecs' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.torch
def test_check_export_script_reports_a_match(run):
    """The README's check command, on the tiny run's export."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_export.py"), str(run["dir"] / "hf"), "--message", "Hi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "chat template renders the same in transformers: True" in out.stdout
    assert "token ids the same in transformers: True" in out.stdout and "  OK" in out.stdout


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.torch
def test_smollm2_chat_finetune_export_transformers_and_chat(tmp_path, monkeypatch, capsys):
    """The README's path on the real model, one step: fine-tune on the chats, load the export in transformers
    (same rendering, tokens and logits), chat with it."""
    run_dir = tmp_path / "run"
    argv = ["finetune", "--config", str(ROOT / "configs" / "smollm2-chat.yaml"), f"data.train_files=[{CHAT}]"]
    argv += [
        "data.validation_files=[]",
        "steps=1",
        "checkpoint.enabled=false",
        "progress=false",
        f"output.dir={run_dir}",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "model      gguf:smollm2: 134.5M parameters" in out and "WARNING" not in out
    hf_dir = run_dir / "hf"
    ours, tokenizer = models.load(f"hf:{hf_dir}", dtype="float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = json.loads(CHAT_VAL.read_text().splitlines()[0])["messages"][:1]
    text = ChatTemplate.for_model(tokenizer).render(messages, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    diff = np.abs(np.asarray(ours(tokens)) - theirs).max()
    print(f"\n[export] SmolLM2 after one chat step: max |logit diff| ours vs transformers = {diff:.2e}")
    assert diff < 1e-3
    monkeypatch.setattr(sys, "stdin", io.StringIO(messages[0]["content"] + "\n"))
    assert cli.main(["chat", str(hf_dir), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_configs_load_and_name_existing_files(name):
    cfg = config_lib.load_config(ROOT / "configs" / name)
    for path in (*cfg.data.train_files, *cfg.data.validation_files, cfg.data.chat_template):
        assert not path or (ROOT / path).is_file(), f"configs/{name} names {path}, which does not exist"
