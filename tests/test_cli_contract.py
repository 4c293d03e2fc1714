"""The input contract of every ``finch-train`` command (docs/training.md, "What every command checks first").

One table of bad inputs, every command, in the style of optax's ``contrib/_common_test.py``: each row is an argv,
the exit code, a fragment of the one error line, and whether the command may read a model file before refusing
(model files and data rows that need the model's tokenizer); every row must leave the workspace as it was, and may
not build a model (unless it reads a model file), run a forward pass, build the train program or fetch data. The
rows run in-process (``train.cli.main``), so the table costs milliseconds a row.

The tests after the table pin the six cases of issue #26 and what a refusal is not: the positive side of each fix.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx
from safetensors.numpy import load_file, save_file

import models
from models.transformer import CausalLM
from train import cli, runlock
from train import program as program_lib
from train.config import HF_EXPORT_DTYPES
from train.export import EXPORT_DTYPES
from train.lab import demo, sources
from train.lab import evaluate as evaluate_lib
from train.paths import OUTPUT_MARKER

ROOT = Path(__file__).resolve().parents[1]
CHATML = ROOT / "configs" / "chatml.jinja"
# A template that knows two roles and skips every other one without a word.
PICKY_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}<u>{{ m.content }}</u>{% elif m.role == 'assistant' %}"
    "<a>{{ m.content }}</a>{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)


def _tiny_hf(directory, *, seed=1, **config):
    model = models.CausalLM(models.get_preset("tiny", **config), rngs=nnx.Rngs(seed))
    models.save_hf(model, models.ByteTokenizer(), directory)
    return Path(directory)


def _rewrite_weights(directory, change):
    path = Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    save_file({name: change(name, value) for name, value in tensors.items()}, str(path), metadata={"format": "pt"})


def _edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _finetune_argv(data, out, *extra):
    return [
        "finetune",
        "model.source=preset:tiny",
        f"data.train_files=[{data}]",
        "data.seq_len=32",
        "data.batch_size=8",
        "steps=2",
        "progress=false",
        "tensorboard=false",
        f"output.dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Every file a row names: good and bad inputs, model folders, one finished tiny run, and an empty cwd."""
    root = tmp_path_factory.mktemp("contract")
    names = {"root": str(root)}

    def add(name, path):
        names[name] = str(path)
        return path

    add("data", root / "data.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Q: {i} plus {i}?", "completion": f" A: {2 * i}."}) + "\n" for i in range(40))
    )
    add("text", root / "retain.txt").write_text("\n\n".join(f"Some plain text number {i}." for i in range(40)))
    add("bad_rows", root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    chat = {"messages": [{"role": "narrator", "content": "Once"}, {"role": "user", "content": "hi"}]}
    chat["messages"].append({"role": "assistant", "content": "hello"})
    add("odd_roles", root / "roles.jsonl").write_text(json.dumps(chat) + "\n")
    add("picky", root / "picky.jinja").write_text(PICKY_TEMPLATE)
    add("chatml", CHATML)
    folder = add("folder", root / "user-folder")
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's own file\n")
    add("file", root / "keep.txt").write_text("the user's own file\n")
    add("missing", root / "missing")
    add("untied", _tiny_hf(root / "untied", tie_embeddings=False))
    add("int_weights", _tiny_hf(root / "int-weights"))
    _rewrite_weights(names["int_weights"], lambda _, v: np.round(v * 100).astype(np.int32))
    add("nan_weights", _tiny_hf(root / "nan-weights"))
    _rewrite_weights(
        names["nan_weights"],
        lambda n, v: np.where(np.arange(v.size).reshape(v.shape) == 3, np.nan, v) if "mlp" in n else v,
    )
    wrong_shape = add("wrong_shape", _tiny_hf(root / "wrong-shape"))
    _edit_config(wrong_shape, intermediate_size=96)
    differing_head = add("differing_head", _tiny_hf(root / "differing-head", tie_embeddings=False))
    _edit_config(differing_head, tie_word_embeddings=True)
    run = add("run", root / "run")
    assert cli.main(_finetune_argv(names["data"], run, "checkpoint.every=0")) == 0
    add("ckpt", run / "checkpoints")
    add("cwd", root / "cwd").mkdir()
    names["long"] = "a" * 450
    return names


# --------------------------------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str  # value, read, write, model, data: the probe's classes
    argv: tuple[str, ...]
    fragment: str
    reads_model: bool = False  # the check needs the model's file (weights) or its tokenizer: it may build the model


def row(kind, argv, fragment, reads_model=False):
    return Row(kind, tuple(argv.split()), fragment, reads_model)


FINETUNE = "finetune model.source=preset:tiny data.train_files=[{data}] output.dir={root}/new steps=2 progress=false"
EVAL = "eval --model preset:tiny --task file:{data} --retain none --quiz-items 0"
COMPARE = (
    "compare --model preset:tiny --task file:{data} --retain file:{text} --method sft --steps 1 --eval-quiz-items 0 "
    "--out {root}/cmp"
)
DEMO = "demo --model preset:tiny --task file:{data} --out {root}/demo"
GENERATE = "generate --model preset:tiny --prompt hi"
CHAT = "chat preset:tiny --chat-template {chatml}"
COMPILE = "compile --topology v5p-8 --model preset:tiny --no-estimate"
BENCH = "bench --model preset:tiny --sections step"

ROWS = {
    # finetune
    "finetune/steps<0": row("value", f"{FINETUNE} steps=-1", "steps must be >= 0, got -1"),
    "finetune/data.seed<0": row("value", f"{FINETUNE} data.seed=-1", "data.seed must be >= 0"),
    "finetune/hf_every<0": row("value", f"{FINETUNE} output.hf_every=-2", "output.hf_every must be >= 0"),
    "finetune/hf_dtype": row("value", f"{FINETUNE} output.hf_dtype=int8", "output.hf_dtype must be one of float32"),
    "finetune/lr": row("value", f"{FINETUNE} optimizer.max_learning_rate=-1", "must be > 0 and finite"),
    # finetune: forgetting-aware settings (#25), refused with the rest before anything loads
    "finetune/select": row("value", f"{FINETUNE} output.select=best", "output.select must be one of last, best_valid"),
    "finetune/select_tolerance<0": row(
        "value", f"{FINETUNE} output.select_tolerance=-0.1", "output.select_tolerance must be a finite number >= 0"
    ),
    "finetune/patience<0": row("value", f"{FINETUNE} guard.patience=-1", "guard.patience and guard.max_retain_kl"),
    "finetune/max_retain_kl<0": row("value", f"{FINETUNE} guard.max_retain_kl=-1", "must be >= 0 (0: off)"),
    "finetune/retain_rows<0": row("value", f"{FINETUNE} data.retain_rows=-1", "data.retain_rows must be >= 0"),
    "finetune/retain_top_k<0": row("value", f"{FINETUNE} data.retain_top_k=-3", "data.retain_top_k must be >= 0"),
    "finetune/generations<0": row("value", f"{FINETUNE} output.generations=-1", "output.generations must be >= 0"),
    "finetune/generation_tokens<0": row(
        "value", f"{FINETUNE} output.generation_tokens=-1", "output.generation_tokens must be >= 0"
    ),
    "finetune/select-without-validation": row(
        "value", f"{FINETUNE} output.select=best_validation", "read the validation loss: set data.validation_files"
    ),
    "finetune/retain-budget-without-retain": row(
        "value", f"{FINETUNE} guard.max_retain_kl=0.5", "read the retain KL: set data.retain_files"
    ),
    "finetune/select-without-checkpoints": row(
        "value",
        FINETUNE + " output.select=best_validation data.validation_files=[{data}] checkpoint.enabled=false",
        "checkpoint.enabled must be true",
    ),
    "finetune/missing-retain": row(
        "read", FINETUNE + " data.retain_files=[{missing}]", "data.retain_files '{missing}' does not exist"
    ),
    "finetune/folder-as-retain": row(
        "read", FINETUNE + " data.retain_files=[{folder}]", "data.retain_files '{folder}' is a directory"
    ),
    "finetune/bad-retain-row": row("data", FINETUNE + " data.retain_files=[{bad_rows}]", ":2: not valid JSON", True),
    "finetune/missing-data": row("read", FINETUNE + " data.train_files=[{missing}]", "does not exist"),
    "finetune/folder-as-data": row("read", FINETUNE + " data.train_files=[{folder}]", "is a directory"),
    "finetune/folder-as-template": row("read", FINETUNE + " data.chat_template={folder}", "is a directory"),
    "finetune/folder-as-config": row("read", FINETUNE + " --config {folder}", "is a directory"),
    "finetune/out-is-a-file": row("write", FINETUNE + " output.dir={file}", "cannot write to"),
    "finetune/missing-model": row("model", FINETUNE + " model.source=hf:{missing}", "folder not found"),
    "finetune/bare-folder-model": row("model", FINETUNE + " model.source={untied}", "a folder needs its kind, hf:"),
    "finetune/int-weights": row("model", FINETUNE + " model.source=hf:{int_weights}", "not floating point", True),
    "finetune/nan-weights": row("model", FINETUNE + " model.source=hf:{nan_weights}", "NaN or inf", True),
    "finetune/wrong-shape": row("model", FINETUNE + " model.source=hf:{wrong_shape}", "but the config implies", True),
    "finetune/bad-row": row("data", FINETUNE + " data.train_files=[{bad_rows}]", ":2: not valid JSON", True),
    "finetune/unknown-role": row(
        "data", FINETUNE + " data.train_files=[{odd_roles}] data.chat_template={picky}", "role 'narrator'", True
    ),
    # eval
    "eval/seq-len<1": row("value", f"{EVAL} --seq-len 0", "eval.seq_len must be >= 1"),
    "eval/batch-size<1": row("value", f"{EVAL} --batch-size -4", "eval.batch_size must be >= 1"),
    "eval/facts-entities<1": row("value", f"{EVAL} --facts-entities -1", "--facts-entities must be >= 1"),
    "eval/seq-len>context": row("value", f"{EVAL} --seq-len 1024", "longer than the model's context of 512"),
    "eval/missing-task": row("read", "eval --model preset:tiny --task file:{missing}", "does not exist"),
    "eval/folder-as-task": row("read", "eval --model preset:tiny --task file:{folder}", "is a directory"),
    "eval/out-is-a-folder": row("write", EVAL + " --out {folder}", "is a directory; give a file path"),
    "eval/out-under-a-file": row("write", EVAL + " --out {file}/x.json", "is a file, not a folder"),
    "eval/missing-model": row("model", "eval --model hf:{missing} --task file:{data}", "folder not found"),
    "eval/base-other-head": row("model", EVAL + " --base hf:{untied}", "has a separate LM head"),
    "eval/nan-weights": row(
        "model", "eval --model hf:{nan_weights} --task file:{data} --retain none --quiz-items 0", "NaN", True
    ),
    "eval/int-weights": row(
        "model", "eval --model hf:{int_weights} --task file:{data} --retain none --quiz-items 0", "int32", True
    ),
    "eval/bad-row": row("data", "eval --model preset:tiny --task file:{bad_rows}", ":2: not valid JSON"),
    # compare (and demo: the same checks, before the demo's data download)
    "compare/steps<1": row("value", f"{COMPARE} --steps 0", "steps must be >= 1"),
    "compare/batch-size<1": row("value", f"{COMPARE} --batch-size 0", "batch_size must be >= 1"),
    "compare/seeds<0": row("value", f"{COMPARE} --seeds -1", "seeds must be >= 0"),
    "compare/eval-every<0": row("value", f"{COMPARE} --eval-every -1", "eval_every must be >= 0"),
    "compare/missing-config": row("read", COMPARE + " --config {missing}", "does not exist"),
    "compare/folder-as-task": row("read", COMPARE + " --task file:{folder}", "is a directory"),
    "compare/out-is-a-file": row("write", COMPARE + " --out {file}", "is a file; give a folder"),
    "compare/missing-model": row("model", COMPARE + " --model hf:{missing}", "folder not found"),
    "compare/int-weights": row("model", COMPARE + " --model hf:{int_weights}", "not floating point", True),
    "compare/bad-row": row("data", COMPARE + " --task file:{bad_rows}", ":2: not valid JSON"),
    "demo/steps<1": row("value", f"{DEMO} --steps 0", "steps must be >= 1"),
    "demo/folder-as-task": row("read", DEMO + " --task file:{folder}", "is a directory"),
    "demo/out-is-a-file": row("write", DEMO + " --out {file}", "is a file; give a folder"),
    "demo/missing-model": row("model", DEMO + " --model gguf:{missing}.gguf", "GGUF file not found"),
    "demo/bad-row": row("data", DEMO + " --task file:{bad_rows}", ":2: not valid JSON"),
    # export
    "export/step<0": row("value", "export {run} --step -1", "--step must be >= 0"),
    "export/missing-run": row("read", "export {missing}", "checkpoint directory: it does not exist"),
    "export/file-as-run": row("read", "export {file}", "checkpoint directory: it is a file"),
    "export/no-such-step": row("read", "export {run} --step 99", "has no checkpoint for step 99"),
    "export/out-is-a-file": row("write", "export {run} --out {file}", "is an existing file; it is left as it is"),
    "export/out-is-a-user-folder": row("write", "export {run} --out {folder}", "files this tool did not write"),
    "export/not-a-checkpoint": row("model", "export {folder}", "no complete checkpoint"),
    # generate
    "generate/new-tokens>context": row("value", f"{GENERATE} --max-new-tokens 100000", "context of 512 tokens"),
    "generate/new-tokens<1": row("value", f"{GENERATE} --max-new-tokens -1", "--max-new-tokens must be >= 1"),
    "generate/temperature<0": row("value", f"{GENERATE} --temperature -1", "--temperature must be a number >= 0"),
    "generate/top-k<1": row("value", f"{GENERATE} --top-k 0", "--top-k must be >= 1"),
    "generate/dtype": row("value", f"{GENERATE} --dtype int8", "--dtype='int8' is not a supported dtype"),
    "generate/missing-model": row("read", "generate --model {missing}/hf --prompt hi", "no such file or folder"),
    "generate/folder-as-template": row("read", GENERATE + " --chat --chat-template {folder}", "is a directory"),
    "generate/not-a-model": row("model", "generate --model {folder} --prompt hi", "no complete checkpoint"),
    "generate/nan-weights": row("model", "generate --model {nan_weights} --prompt hi", "NaN or inf", True),
    "generate/wrong-shape": row("model", "generate --model {wrong_shape} --prompt hi", "has shape (128, 64)", True),
    "generate/prompt>context": row(
        "data", "generate --model preset:tiny --prompt {long} --max-new-tokens 100", "past the model's context", True
    ),
    "generate/unknown-role": row(
        "data", GENERATE + " --chat --chat-template {picky} --system be-brief", "role 'system'", True
    ),
    # chat
    "chat/new-tokens>context": row("value", f"{CHAT} --max-new-tokens 600", "leaves no room for a prompt"),
    "chat/temperature<0": row("value", f"{CHAT} --temperature -0.5", "--temperature must be a number >= 0"),
    "chat/missing-model": row("read", "chat {missing}/run", "no such file or folder"),
    "chat/missing-template": row("read", "chat preset:tiny --chat-template {missing}", "does not exist"),
    "chat/int-weights": row("model", "chat hf:{int_weights} --chat-template {chatml}", "not floating point", True),
    "chat/differing-tied-head": row(
        "model", "chat hf:{differing_head} --chat-template {chatml}", "differs from the embedding", True
    ),
    "chat/unknown-role": row("data", "chat preset:tiny --chat-template {picky} --system x", "role 'system'", True),
    # compile
    "compile/num-slices<1": row("value", f"{COMPILE} --num-slices 0", "--num-slices must be a positive integer"),
    "compile/max-batch<0": row("value", f"{COMPILE} --max-batch -1", "--max-batch must be >= 0"),
    "compile/seq-len<1": row("value", f"{COMPILE} data.seq_len=0", "data.seq_len must be >= 1"),
    "compile/missing-config": row("read", COMPILE + " --config {missing}", "does not exist"),
    "compile/folder-as-config": row("read", COMPILE + " --config {folder}", "is a directory"),
    "compile/out-is-a-folder": row("write", COMPILE + " --out {folder}", "is a directory; give a file path"),
    "compile/out-under-a-file": row("write", COMPILE + " --out {file}/r.json", "is a file, not a folder"),
    "compile/missing-model": row("model", "compile --topology v5p-8 --model hf:{missing}", "folder not found"),
    "compile/folder-without-config": row("model", "compile --topology v5p-8 --model hf:{folder}", "no config.json"),
    # bench
    "bench/batch-size<1": row("value", f"{BENCH} --batch-size 0", "--batch-size and --seq-len must be positive"),
    "bench/max-minutes<=0": row("value", f"{BENCH} --max-minutes 0", "--max-minutes must be > 0"),
    "bench/seed<0": row("value", f"{BENCH} --seed -1", "--seed must be >= 0"),
    "bench/missing-table": row("read", "bench --table {missing}", "does not exist"),
    "bench/folder-as-table": row("read", "bench --table {folder}", "is a directory"),
    "bench/out-is-a-folder": row("write", BENCH + " --out {folder}", "is a directory; give a file path"),
    "bench/missing-model": row("model", "bench --model hf:{missing} --sections step", "folder not found"),
    "bench/model-without-config": row("model", "bench --model hf:{folder} --sections step", "no config.json"),
    # prepare
    "prepare/unknown-source": row("value", "prepare nosuch", "unknown dataset 'nosuch'"),
    "prepare/missing-package-root": row("read", "prepare austen --package-root {missing}", "does not exist"),
    "prepare/file-as-package-root": row("read", "prepare austen --package-root {file}", "is a file; give a folder"),
    "prepare/cache-is-a-file": row("write", "prepare austen --cache-dir {file}", "is a file; give a folder"),
}


def _snapshot(directory):
    """{relative path: (size, mtime, sha1)} of every file and folder under ``directory``."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(directory))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return out


def _forbid_work(monkeypatch, *, reads_model: bool) -> None:
    """Makes every kind of real work an AssertionError: the row must be refused before it."""

    def refuse(what):
        def refused(*args, **kwargs):
            raise AssertionError(f"{what} before the bad input was refused")

        return refused

    monkeypatch.setattr(CausalLM, "__call__", refuse("a forward pass ran"))
    monkeypatch.setattr(program_lib, "build_program", refuse("the train program was built"))
    monkeypatch.setattr(sources, "prepare", refuse("data was fetched"))
    monkeypatch.setattr(demo, "prepare", refuse("data was fetched"))
    monkeypatch.setattr(evaluate_lib.Evaluator, "__init__", refuse("an evaluation started"))
    if not reads_model:
        monkeypatch.setattr(CausalLM, "__init__", refuse("a model was built"))


def _main(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("name", list(ROWS))
def test_a_bad_input_is_one_line_and_exit_2_before_any_work_and_changes_nothing(name, workspace, monkeypatch, capsys):
    r = ROWS[name]
    argv = [a.format(**workspace) for a in r.argv]
    monkeypatch.chdir(workspace["cwd"])
    before = _snapshot(workspace["root"])
    _forbid_work(monkeypatch, reads_model=r.reads_model)
    code = _main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"finch-train {argv[0]}: error: "), err
    assert r.fragment.format(**workspace) in lines[0], lines[0]
    assert _snapshot(workspace["root"]) == before


def test_the_built_in_retain_text_and_wandb_are_asked_for_before_anything_loads(workspace, monkeypatch, capsys):
    """Two inputs the table cannot set in argv: the data cache the built-in retain text is read from, and wandb."""
    argv = [a.format(**workspace) for a in FINETUNE.split()]
    before = _snapshot(workspace["root"])
    _forbid_work(monkeypatch, reads_model=False)
    monkeypatch.setenv("FINCH_DATA_DIR", workspace["missing"])
    assert cli.main([*argv, "data.retain_files=[builtin]"]) == 2
    assert "does not exist yet: run `finch-train prepare retain`" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    assert cli.main([*argv, "wandb_project=probe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finch-train finetune: error: wandb_project='probe' needs the wandb package"), err
    assert _snapshot(workspace["root"]) == before


def test_the_table_covers_every_command_with_every_class_that_applies_to_it():
    covered = {}
    for name, r in ROWS.items():
        covered.setdefault(name.split("/")[0], set()).add(r.kind)
    every = {"value", "read", "write", "model", "data"}
    # What a command does not have: generate and chat write nothing; export, compile, bench and prepare read no
    # data rows; prepare loads no model.
    expected = {
        "finetune": every,
        "eval": every,
        "compare": every,
        "demo": every,
        "export": every - {"data"},
        "generate": every - {"write"},
        "chat": every - {"write"},
        "compile": every - {"data"},
        "bench": every - {"data"},
        "prepare": {"value", "read", "write"},
    }
    assert covered == expected
    assert set(covered) == set(cli.SUBCOMMANDS)


# --------------------------------------------------------------------------------------------------------------------
# Issue #26, case by case: what the refusals above leave possible


def test_export_replaces_only_its_own_earlier_export_and_anything_with_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", workspace["run"], "--out", str(out)]) == 0
    assert (out / OUTPUT_MARKER).is_file() and (out / "model.safetensors").is_file()
    (out / "model.safetensors").write_bytes(b"stale")
    assert cli.main(["export", workspace["run"], "--out", str(out)]) == 0  # its own: replaced without asking
    assert (out / "model.safetensors").stat().st_size > 5
    user_file = tmp_path / "mine.txt"
    user_file.write_text("mine\n")
    assert cli.main(["export", workspace["run"], "--out", str(user_file)]) == 2
    assert user_file.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine.txt"]
    assert cli.main(["export", workspace["run"], "--out", str(user_file), "--overwrite"]) == 0
    assert (user_file / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine.txt"]  # no hidden leftovers
    capsys.readouterr()


def test_the_runs_own_export_folders_carry_the_marker(workspace):
    assert (Path(workspace["run"]) / "hf" / OUTPUT_MARKER).is_file()
    assert set(EXPORT_DTYPES) == set(HF_EXPORT_DTYPES)


def test_generation_never_runs_past_the_context():
    model, _ = models.load("preset:tiny")
    context = model.config.max_position_embeddings
    prompt = [1] * (context - 3)
    with pytest.raises(models.ConfigError, match=f"past the model's context of {context}; ask for at most 3 new"):
        models.generate(model, [prompt], 4)
    with pytest.raises(models.ConfigError, match="past the model's context"):
        next(models.generate_stream(model, prompt, 4))
    with pytest.raises(models.ConfigError, match="leaves no room"):
        models.generate(model, [[1] * context], 1)
    assert len(models.generate(model, [prompt], 3)[0]) == 3  # exactly up to the context


def test_eval_base_with_an_untied_head_from_a_gguf_file_names_both_models(workspace, tmp_path, capsys):
    from test_models_gguf import write_gguf

    cfg = models.get_preset("tiny", tie_embeddings=False)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(2))
    gguf_file = tmp_path / "untied.gguf"
    write_gguf(gguf_file, cfg, models.weights.model_to_hf_tensors(model))
    argv = ["eval", "--model", "preset:tiny", "--base", f"gguf:{gguf_file}", "--task", f"file:{workspace['data']}"]
    assert cli.main([*argv, "--retain", "none", "--quiz-items", "0"]) == 2
    err = capsys.readouterr().err
    assert "Incorrect number of leaves" not in err
    assert f"preset:tiny ties its LM head to the embedding, gguf:{gguf_file} has a separate LM head" in err


def test_eval_out_is_written_once_the_work_is_done_into_a_new_folder(workspace, tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "metrics.json"
    argv = ["eval", "--model", "preset:tiny", "--task", f"file:{workspace['data']}", "--retain", "none"]
    assert cli.main([*argv, "--quiz-items", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no stray .tmp
    capsys.readouterr()


def test_an_unwritable_checkpoint_folder_is_found_at_the_start_even_with_an_old_lock_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / runlock.LOCK_NAME).write_text("")  # left by an earlier run
    if subprocess.run(["chattr", "+i", str(ckpt)], capture_output=True).returncode:
        pytest.skip(reason="chattr +i does not work on this filesystem")
    try:
        with pytest.raises(runlock.UnwritableDirectoryError, match="cannot write to"):
            with runlock.hold([str(ckpt)]):
                pass
    finally:
        subprocess.run(["chattr", "-i", str(ckpt)])


def test_a_refused_run_leaves_no_run_folder_behind(workspace, tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    argv = _finetune_argv(workspace["bad_rows"], out)  # refused once the data is read, after the lock was taken
    assert cli.main(argv) == 2
    assert ":2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------------------------
# Summaries tell the truth


def test_a_run_that_skipped_steps_and_diverged_says_so(workspace, tmp_path, capsys):
    out = tmp_path / "diverged"
    extra = ["optimizer.max_learning_rate=1e6", "optimizer.base_learning_rate=1e6", "guard.max_consecutive_skips=2"]
    assert cli.main(_finetune_argv(workspace["data"], out, "steps=12", *extra)) == 3
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r["consecutive_skips"] > 0 for r in records)
    assert skipped >= 2 and summary["skipped_steps"] == skipped
    assert summary["complete"] is False and "training diverged" in summary["interrupted"]
    assert summary["steps"][1] == records[-1]["step"] < 12 and summary["hf"] is None
    assert f"skipped    {skipped} of {len(records)} steps had a NaN/inf loss" in captured.out
    assert "stopped    before step 12: training diverged" in captured.out


def test_a_run_that_skipped_steps_and_still_exits_0_counts_them(workspace, tmp_path, capsys):
    """The issue's case: with the divergence guard off, a run of mostly skipped steps ends with rc 0, and says so."""
    out = tmp_path / "skipping"
    extra = ["optimizer.max_learning_rate=1e6", "optimizer.base_learning_rate=1e6", "guard.max_consecutive_skips=0"]
    assert cli.main(_finetune_argv(workspace["data"], out, "steps=6", "output.hf_export=false", *extra)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r["consecutive_skips"] > 0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert skipped >= 2 and summary["skipped_steps"] == skipped and summary["complete"] is True
    assert f"skipped    {skipped} of 6 steps had a NaN/inf loss" in capsys.readouterr().out


def test_a_finished_run_says_it_is_complete_and_skipped_nothing(workspace):
    summary = json.loads((Path(workspace["run"]) / "summary.json").read_text())
    assert summary["complete"] is True and summary["interrupted"] is None and summary["skipped_steps"] == 0
    assert yaml.safe_load((Path(workspace["run"]) / "config.yaml").read_text())["steps"] == 2
    assert os.path.isdir(summary["hf"])
