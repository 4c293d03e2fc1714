"""LoRA and QLoRA: adapters beside the kernels, a frozen (maybe quantized) base, adapter-only checkpoints and
resume, the merged Hugging Face export and the PEFT adapter that peft loads with our logits."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import models
from models import lora
from train import cli, finetune
from train import config as config_lib
from train import program as program_lib
from train.resume import ResumeMismatchError
from train.step import split_model

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.arange(48, dtype=np.int32).reshape(2, 24) % 300 + 3


def _randomized_adapters(model, seed=1):
    """Adapters with a non-zero B, so that they change the model's output."""
    for i, (_, name, module) in enumerate(lora._projections(model)):
        b = getattr(module, f"{name}_lora_b")
        if b is not None:
            b.set_value(0.05 * jax.random.normal(jax.random.key(seed * 100 + i), b.shape, b.dtype))
    return model


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_sit_beside_every_target_with_its_axes_and_change_nothing_at_first(scan):
    model, _ = models.load("preset:tiny", scan_layers=scan)
    before = np.asarray(model(TOKENS))
    lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj")))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), before)  # B starts at zero
    block = model.layers if scan else model.layers[0]
    lead = (2,) if scan else ()
    assert block.attn.q_proj_lora_a.shape == (*lead, 64, 4) and block.attn.q_proj_lora_b.shape == (*lead, 4, 4, 16)
    assert block.attn.o_proj_lora_a.shape == (*lead, 4, 16, 4) and block.attn.o_proj_lora_b.shape == (*lead, 4, 64)
    assert getattr(block.attn, "k_proj_lora_a", None) is None  # only the targets
    axes = block.attn.o_proj_lora_a.get_metadata()["out_sharding"]
    assert tuple(axes) == (("layers",) if scan else ()) + ("heads", "head_dim", None)
    _, adapters, base = split_model(model)
    n_layers = 1 if scan else 2
    assert len(jax.tree.leaves(adapters)) == 2 * 3 * n_layers  # A and B per target per (stacked) layer
    assert all("lora" not in "/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0])


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_merging_gives_the_adapted_models_logits(scan, quantize):
    model, _ = models.load("preset:tiny", scan_layers=scan)
    spec = lora.LoraSpec(rank=4, alpha=8.0, quantize=quantize, block=16, rslora=quantize == "int8")
    lora.quantize_base(_randomized_adapters(lora.add_lora(model, spec)), spec)
    adapted = np.asarray(model(TOKENS))
    _, adapters, frozen = split_model(model)
    as_plain = lora.merged_params(adapters, frozen, spec, stacked=scan)  # the pure-function form, for evaluations
    merged = lora.merge_lora(model)
    _, plain_params, _ = split_model(merged)
    for x, y in zip(jax.tree.leaves(as_plain), jax.tree.leaves(plain_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert not lora.has_lora(merged) and not hasattr(merged.layers if scan else merged.layers[0], "quantized")
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), adapted, atol=2e-5)


def _nf4_reference(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: blocks along the last axis, absmax per block, the nearest of the 16 levels by brute force."""
    blocks = w.reshape(*w.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1)
    normed = blocks / absmax[..., None]
    codes = np.abs(normed[..., None] - lora.NF4_LEVELS).argmin(-1).reshape(w.shape)
    return codes, absmax


def test_nf4_and_int8_codes_and_their_error_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 64)).astype(np.float32)
    packed, absmax = lora._nf4_quantize(jnp.asarray(w), 16)
    codes = np.stack([np.asarray(packed) >> 4, np.asarray(packed) & 15], -1).reshape(w.shape)
    want_codes, want_absmax = _nf4_reference(w, 16)
    np.testing.assert_array_equal(np.asarray(absmax), want_absmax)
    np.testing.assert_array_equal(codes, want_codes)
    back = np.asarray(lora.dequantize("nf4", packed, absmax, jnp.float32))
    np.testing.assert_allclose(back, lora.NF4_LEVELS[want_codes] * np.repeat(want_absmax, 16, -1), rtol=1e-6)
    # The largest gap between neighbouring levels is 0.304: no value is off by more than half of it (× absmax).
    assert np.all(np.abs(back - w) <= 0.153 * np.repeat(want_absmax, 16, -1))
    q, scale = lora._int8_quantize(jnp.asarray(w), 16)
    back8 = np.asarray(lora.dequantize("int8", q, scale, jnp.float32))
    assert np.asarray(q).dtype == np.int8 and np.all(np.abs(back8 - w) <= np.repeat(want_absmax, 16, -1) / 254 + 1e-7)


def test_bad_lora_settings_are_config_errors():
    for settings, fragment in (
        (dict(rank=0), "rank must be >= 1"),
        (dict(targets=("qkv",)), "choose from q_proj"),
        (dict(quantize="int3"), "quantize must be one of"),
        (dict(dropout=1.0), "dropout must be in"),
    ):
        with pytest.raises(models.ConfigError, match=fragment):
            lora.LoraSpec(**settings)
    model, _ = models.load("preset:tiny")
    with pytest.raises(models.ConfigError, match="does not divide"):
        lora.quantize_base(model, lora.LoraSpec(rank=2, quantize="nf4", block=48))


def test_adapter_state_of_smollm2_is_a_small_fraction_of_full_fine_tuning():
    """The issue's target: optimizer + trainable state with rank-16 LoRA on every projection <= 5% of full FT."""

    def state_bytes(*overrides):
        cfg = config_lib.load_config(None, ["model.source=preset:smollm2-135m", "data.batch_size=8", *overrides])
        program, _, _ = program_lib.build_program(cfg, program_lib.abstract_model(cfg.model))
        trained = (program.abstract_state.params, program.abstract_state.opt_state)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trained))

    full, adapters = state_bytes(), state_bytes("model.lora.rank=16")
    print(f"\n[lora] SmolLM2-135M trained state: full {full / 2**20:.1f} MiB, rank-16 LoRA {adapters / 2**20:.1f} MiB")
    assert adapters <= 0.05 * full


# --------------------------------------------------------------------------------------------------------------------
# a LoRA fine-tune end to end, on a tiny base written as a Hugging Face directory (so transformers can load it)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base") / "hf"
    model, tokenizer = models.load("preset:tiny", seed=3)
    models.save_hf(model, tokenizer, directory)
    return directory


def _overrides(base_dir, out, steps, *extra):
    return [
        f"data.train_files=[{ROOT / 'configs' / 'data' / 'chat.jsonl'}]",
        f"data.chat_template={ROOT / 'configs' / 'chatml.jinja'}",
        f"data.validation_files=[{ROOT / 'configs' / 'data' / 'chat_val.jsonl'}]",
        f"model.source=hf:{base_dir}",
        "model.dtype=float32",
        "model.lora.rank=4",
        "model.lora.alpha=16",
        "optimizer.max_learning_rate=3e-2",
        "optimizer.base_learning_rate=3e-2",
        f"steps={steps}",
        "checkpoint.every=2",
        "progress=false",
        "tensorboard=false",
        f"output.dir={out}",
        *extra,
    ]


def _argv(base_dir, out, steps, *extra):
    return ["finetune", "--config", str(ROOT / "configs" / "tiny-chat.yaml"), *_overrides(base_dir, out, steps, *extra)]


def _config(base_dir, out, steps, *extra):
    return config_lib.load_config(ROOT / "configs" / "tiny-chat.yaml", _overrides(base_dir, out, steps, *extra))


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return {"dir": out, "result": finetune.run(_config(base_dir, out, 4))}


def test_only_the_adapters_train_and_the_base_stays_bit_for_bit(lora_run, base_dir):
    result = lora_run["result"]
    assert result.losses[-1] < result.losses[0]
    params_paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(result.params)[0]]
    assert params_paths and all("_lora_" in p for p in params_paths)
    base, _ = models.load(f"hf:{base_dir}")
    _, base_params, _ = split_model(base)
    frozen = jax.device_get(result.state.frozen)
    for want, got in zip(jax.tree.leaves(base_params), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    moved = [np.abs(np.asarray(b)).max() for p, b in jax.tree_util.tree_flatten_with_path(result.params)[0]]
    assert max(moved) > 0


def test_checkpoints_hold_the_adapters_and_resume_is_bitwise_exact(lora_run, base_dir, tmp_path):
    meta = json.loads((lora_run["dir"] / "checkpoints" / "4" / "meta" / "metadata").read_text())
    paths = [p for p, _, _ in meta["signature"]]
    assert any("_lora_a" in p for p in paths) and not any(p.endswith("q_proj") for p in paths)
    assert meta["frozen_digest"]
    out = tmp_path / "resumed"
    assert cli.main(_argv(base_dir, out, 2)) == 0  # a run stopped at step 2 ...
    resumed = finetune.run(_config(base_dir, out, 4)).state  # ... and continued to 4 in another call
    assert int(np.asarray(resumed.step)) == 4
    straight = lora_run["result"].state
    for a, b in zip(
        jax.tree.leaves((straight.params, straight.opt_state)), jax.tree.leaves((resumed.params, resumed.opt_state))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_onto_a_changed_base_is_refused(lora_run, base_dir, tmp_path):
    changed = tmp_path / "base"
    changed.mkdir()
    for f in base_dir.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert cli.main(_argv(changed, out, 2)) == 0
    tensors = load_file(changed / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(changed / "model.safetensors"))
    with pytest.raises(ResumeMismatchError, match="base model with digest"):
        finetune.run(_config(changed, out, 4))


def test_peft_and_transformers_load_both_exports_with_our_logits(lora_run, base_dir):
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    peft = pytest.importorskip("peft", reason="the test extra installs peft")
    ours = np.asarray(lora_run["result"].model(TOKENS))
    adapter_dir = lora_run["dir"] / "hf-adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == str(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(lora_run["dir"] / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        via_peft = with_adapter(torch.tensor(TOKENS)).logits.numpy()
        via_merged = merged(torch.tensor(TOKENS)).logits.numpy()
    print(
        f"\n[lora] max |logit diff| ours vs peft {np.abs(via_peft - ours).max():.1e}, merged export "
        f"{np.abs(via_merged - ours).max():.1e}"
    )
    np.testing.assert_allclose(via_peft, ours, atol=1e-4)
    np.testing.assert_allclose(via_merged, ours, atol=1e-4)


def test_generate_talks_to_the_adapter_directory_and_the_merged_export(lora_run, capsys):
    outputs = []
    for model in (lora_run["dir"] / "hf-adapter", lora_run["dir"] / "hf"):
        assert cli.main(["generate", "--model", str(model), "--prompt", "Hi", "--max-new-tokens", "6"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_qlora_trains_against_a_fixed_nf4_base_with_dropout(base_dir, tmp_path):
    extra = ["model.lora.quantize=nf4", "model.lora.block=16", "model.lora.dropout=0.1", "checkpoint.enabled=false"]
    result = finetune.run(_config(base_dir, tmp_path / "q", 3, *extra))
    assert np.all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]
    codes = [x for p, x in jax.tree_util.tree_flatten_with_path(result.state.frozen)[0] if "codes" in str(p[-1])]
    assert codes and all(np.asarray(c).dtype == np.uint8 for c in codes)
