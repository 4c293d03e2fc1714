"""``hub:REPO_ID[@REVISION]`` models from a pre-populated huggingface_hub cache with HF_HUB_OFFLINE=1 (no network),
and the errors and hints around Hub names."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import models
from models import hub, lora
from train import cli, export, generate, program
from train.config import load_config

hub_constants = pytest.importorskip("huggingface_hub.constants")

ROOT = Path(__file__).resolve().parents[1]
REPO = "finch-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Lays ``source``'s files out as huggingface_hub's cache does: content-addressed blobs, a snapshot folder of
    links to them per commit, and ``refs/<branch or tag>`` files that hold the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / commit), repo / "snapshots" / commit / file.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny model exported in shards, in a Hub cache as ``finch-test/tiny-llama`` (branch main, tag v1)."""
    root = tmp_path_factory.mktemp("hub")
    model = models.CausalLM(models.get_preset("tiny", tie_embeddings=False), rngs=nnx.Rngs(7))
    models.save_hf(model, models.ByteTokenizer(), root / "export", max_shard_bytes=200_000)
    assert (root / "export" / "model.safetensors.index.json").is_file()
    cache = root / "cache"
    _cache_repo(cache, REPO, root / "export", COMMIT, refs=("main", "v1"))
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    return {"cache": cache, "logits": np.asarray(model(tokens)), "tokens": tokens}


@pytest.fixture()
def offline(cached, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=the fixture's cache, for this process (huggingface_hub reads both once, at
    import, so its constants are set too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cached["cache"]))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cached["cache"]))
    return cached


@pytest.mark.parametrize("revision", ["", "@main", "@v1", f"@{COMMIT}"])
def test_a_cached_hub_model_loads_offline_with_its_weights_and_tokenizer(offline, revision):
    model, tokenizer = models.load(f"hub:{REPO}{revision}")
    np.testing.assert_array_equal(np.asarray(model(offline["tokens"])), offline["logits"])
    assert tokenizer.encode("hi") == [ord("h"), ord("i")]
    assert models.load_config(f"hub:{REPO}{revision}") == model.config


def test_not_cached_offline_is_a_clear_error_with_the_download_command(offline, capsys):
    with pytest.raises(models.ConfigError, match="HF_HUB_OFFLINE is set and it is not in the cache") as info:
        models.load("hub:finch-test/absent")
    assert "`hf download finch-test/absent`" in str(info.value)
    with pytest.raises(models.ConfigError, match=f"`hf download {REPO} --revision v9`"):
        models.load_config(f"hub:{REPO}@v9")
    assert cli.main(["generate", "--model", "hub:finch-test/absent", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "finch-train generate: error: model hub:finch-test/absent: HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hub:Qwen//Qwen3", "is not a Hugging Face Hub repo id"),
        ("hub:Qwen/Qwen3 0.6B", "is not a Hugging Face Hub repo id"),
        ("hub:a/b/c", "is not a Hugging Face Hub repo id"),
        ("hub:Qwen/Qwen3--0.6B", "is not a Hugging Face Hub repo id"),
        ("hub:Qwen/Qwen3-0.6B@", "empty revision"),
        ("Qwen/Qwen3-0.6B", r"\(a Hub model is hub:Qwen/Qwen3-0.6B; a local directory is hf:Qwen/Qwen3-0.6B\)"),
    ],
)
def test_malformed_hub_names_are_refused_when_parsed(spec, message):
    with pytest.raises(models.ConfigError, match=message):
        models.parse_source(spec)


def test_a_repo_id_given_as_hf_dir_gets_the_hub_spelling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ConfigError, match="for the Hugging Face Hub model use hub:Qwen/Qwen3-0.6B"):
        models.load("hf:Qwen/Qwen3-0.6B")
    with pytest.raises(models.ConfigError, match="for the Hugging Face Hub model use hub:Qwen/Qwen3-0.6B"):
        models.load_config("hf:Qwen/Qwen3-0.6B")
    # The CLI refuses a bare repo id before any work, with both spellings.
    assert cli.main(["finetune", "model.source=Qwen/Qwen3-0.6B", "--print-config"]) == 2
    assert "a Hub model is hub:Qwen/Qwen3-0.6B" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_repo_id_shapes():
    assert hub.parse_ref("Qwen/Qwen3-0.6B@refs/pr/3") == ("Qwen/Qwen3-0.6B", "refs/pr/3")
    assert hub.parse_ref("gpt2") == ("gpt2", None)  # a legacy id without a namespace
    assert hub.looks_like_repo_id("Qwen/Qwen3-0.6B@main")
    assert not hub.looks_like_repo_id("gpt2")  # too likely a local name to hint at the Hub
    assert not hub.looks_like_repo_id("./runs/x")


def test_the_environment_variables_alone_select_cache_and_offline_mode(cached, tmp_path):
    """`finch-train generate --model hub:...` in a fresh process, with only HF_HUB_CACHE and HF_HUB_OFFLINE set."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cached["cache"]),
        "HF_HUB_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "train", "generate", "--model", f"hub:{REPO}@v1", "--prompt", "ab"]
    out = subprocess.run(command + ["--max-new-tokens", "3"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ab\u2192")


def test_a_lora_adapter_on_a_hub_base_names_it_as_peft_does_and_loads_back(offline, tmp_path):
    """The PEFT adapter of a `hub:` run records the bare repo id and its revision (PEFT's convention); `generate` and
    `chat` load that base from the Hub cache and merge the adapter."""
    cfg = load_config(None, [f"model.source=hub:{REPO}@v1", "model.lora.rank=4"])
    model, tokenizer = models.load(cfg.model.source)
    model = lora.add_lora(model, program.lora_spec(cfg.model), seed=1)
    for i, (_, name, module) in enumerate(lora._projections(model)):
        b = getattr(module, f"{name}_lora_b", None)
        if b is not None:  # non-zero, so the adapter changes the logits
            b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    adapted = np.asarray(model(offline["tokens"]))
    assert not np.array_equal(adapted, offline["logits"])
    export.export_run(model, tokenizer, cfg, tmp_path / "hf")
    adapter_config = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == (REPO, "v1")
    loaded = generate.load_for_generation(str(tmp_path / "hf-adapter"))
    assert loaded.description.endswith(f"on hub:{REPO}@v1)")
    np.testing.assert_allclose(np.asarray(loaded.model(offline["tokens"])), adapted, atol=1e-5)
