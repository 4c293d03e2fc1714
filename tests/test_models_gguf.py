"""GGUF import without the big wheel: tiny files written with gguf.GGUFWriter from a known model.

The writer side re-implements llama.cpp's converter conventions (Q/K row permutation, reversed dims, names), so a
load that matches the source model proves the importer undoes them."""

import dataclasses

import gguf
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models.gguf_loader import GGUFError, dequantize_tensor, unpermute_rope_rows
from models.weights import model_from_hf_tensors, model_to_hf_tensors

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(weight, num_heads):
    """What llama.cpp's convert_hf_to_gguf does to Q/K rows: split each head's rotate-half halves into pairs."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads, head_dim in [(1, 2), (3, 8), (9, 64)]:
        w = rng.normal(size=(heads * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
        assert not np.array_equal(llama_cpp_permute(w, heads), w) or head_dim == 2
    # Rows of head 0 arrive interleaved: [r0, r_{d/2}, r1, r_{d/2+1}, ...].
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert llama_cpp_permute(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


_GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def write_gguf(path, cfg, tensors, *, matrix_type=Q.F16, embed_type=Q.Q8_0, norm_type=Q.F32, pre="gpt-2"):
    """Writes HF-named ``tensors`` with ``cfg`` as metadata, the way llama.cpp's converter would.

    Q/K rows are permuted for the llama architecture only (llama.cpp runs qwen2/qwen3 with rotate-half RoPE).
    Returns the HF tensors as the file stores them (after quantization rounding)."""
    permute = cfg.architecture == "llama"
    writer = gguf.GGUFWriter(str(path), cfg.architecture)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.mlp_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    byte_chars = _byte_alphabet()
    merged = byte_chars[ord("h")] + byte_chars[ord("e")]
    tokens = byte_chars + [merged] + [f"<extra_{i}>" for i in range(cfg.vocab_size - len(byte_chars) - 1)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3] * (cfg.vocab_size - 257))
    writer.add_token_merges([f"{byte_chars[ord('h')]} {byte_chars[ord('e')]}"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    stored = {}
    for name, weight in tensors.items():
        if name.startswith("model.layers."):
            layer, sub = name[len("model.layers.") :].split(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[sub]}"
            if permute and sub == "self_attn.q_proj.weight":
                weight = llama_cpp_permute(weight, cfg.num_heads)
            elif permute and sub == "self_attn.k_proj.weight":
                weight = llama_cpp_permute(weight, cfg.num_kv_heads)
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        qtype = norm_type if weight.ndim == 1 else embed_type if "embed" in name else matrix_type
        data = weight if qtype == Q.F32 else gguf.quants.quantize(weight, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        restored = weight if qtype == Q.F32 else gguf.quants.dequantize(data, qtype)
        if permute and name.endswith("q_proj.weight"):
            restored = unpermute_rope_rows(restored, cfg.num_heads)
        elif permute and name.endswith("k_proj.weight"):
            restored = unpermute_rope_rows(restored, cfg.num_kv_heads)
        stored[name] = restored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _byte_alphabet():
    # GPT-2's printable stand-ins for the 256 byte values, in byte order.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@pytest.fixture(scope="module")
def tiny_source():
    cfg = models.get_preset("tiny", tie_embeddings=False)
    return models.CausalLM(cfg, rngs=nnx.Rngs(5))


@pytest.mark.parametrize("matrix_type", [Q.F16, Q.Q4_1, Q.Q8_0, Q.F32])
def test_tiny_gguf_loads_exactly_what_the_file_stores(tiny_source, matrix_type, tmp_path):
    path = tmp_path / "tiny.gguf"
    embed_type = Q.F32 if matrix_type == Q.F32 else Q.Q8_0
    stored = write_gguf(
        path, tiny_source.config, model_to_hf_tensors(tiny_source), matrix_type=matrix_type, embed_type=embed_type
    )
    model, tokenizer = models.load_gguf(path)
    assert dataclasses.replace(model.config, bos_token_id=None, eos_token_id=None) == dataclasses.replace(
        tiny_source.config, bos_token_id=None, eos_token_id=None
    )
    expected = model_from_hf_tensors(tiny_source.config, stored)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(expected(tokens)))
    # Against the unquantized source: exact for F32, within the quantization noise otherwise (logits are O(2)).
    tolerance = {Q.F32: 1e-5, Q.F16: 0.1, Q.Q8_0: 0.2, Q.Q4_1: 1.5}[matrix_type]
    diff = np.abs(np.asarray(model(tokens)) - np.asarray(tiny_source(tokens))).max()
    print(f"\n[gguf] {matrix_type.name}: max |logit diff| vs unquantized source {diff:.2e}")
    assert diff < tolerance
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (257, 258, 512)
    assert tokenizer.encode("hello") == [256, ord("l"), ord("l"), ord("o")]  # the one merge, then bytes
    assert tokenizer.encode("<extra_3>x", add_bos=True) == [257, 260, ord("x")]  # 256 + 1 + 3
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"


def test_unsupported_quantization_type_is_named(tiny_source, tmp_path):
    path = tmp_path / "f64.gguf"
    write_gguf(path, tiny_source.config, model_to_hf_tensors(tiny_source))
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    fake = dataclasses.make_dataclass("T", ["name", "tensor_type", "data", "shape"])(
        tensor.name, Q.IQ2_XXS, tensor.data, tensor.shape
    )
    with pytest.raises(GGUFError, match="'blk.0.attn_norm.weight' uses quantization type IQ2_XXS"):
        dequantize_tensor(fake, source=str(path))


def test_bad_files_and_fields(tiny_source, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="junk.gguf: not a readable GGUF file"):
        models.load_gguf(junk)
    from models.gguf_loader import config_from_gguf_fields

    with pytest.raises(GGUFError, match=r"general.architecture='gemma2' is not supported \(supported: llama, qwen2"):
        config_from_gguf_fields({"general.architecture": "gemma2"})
    with pytest.raises(GGUFError, match="'llama.block_count' is missing"):
        config_from_gguf_fields(
            {
                "general.architecture": "llama",
                "llama.attention.head_count": 4,
                "llama.embedding_length": 64,
                "llama.vocab_size": 512,
            }
        )
    with pytest.raises(models.TokenizerError, match="tokenizer.ggml.model='llama' is not supported"):
        models.Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama"})
    with pytest.raises(models.TokenizerError, match="tokenizer.ggml.pre='deepseek-coder' is not supported"):
        models.Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-coder"})


def test_shape_mismatch_between_metadata_and_tensors(tmp_path):
    cfg = models.get_preset("tiny")
    narrower = models.CausalLM(dataclasses.replace(cfg, mlp_dim=96), rngs=nnx.Rngs(6))
    path = tmp_path / "lying.gguf"
    write_gguf(path, cfg, model_to_hf_tensors(narrower))  # metadata says mlp 128, tensors have 96
    with pytest.raises(
        models.WeightError,
        match=r"'blk\.0\.ffn_gate\.weight' \(= model\.layers\.0\.mlp\.gate_proj\.weight\) has shape \(96, 64\), but the config implies \(128, 64\)",
    ):
        models.load_gguf(path)


TINY_VARIANTS = {
    "llama": dict(tie_embeddings=False),
    "qwen2": dict(architecture="qwen2", attention_bias=True),
    # head_dim 128 (as in real Qwen3) because transformers' GGUF reader ignores qwen3.attention.key_length and
    # falls back to Qwen3Config's default of 128. 128 != d_model / heads = 16, so ours must read key_length.
    "qwen3": dict(architecture="qwen3", qk_norm=True, head_dim=128, tie_embeddings=False),
}
PRE_TOKENIZER = {"llama": "gpt-2", "qwen2": "qwen2", "qwen3": "qwen2"}


def _variant_model(name):
    model = models.CausalLM(models.get_preset("tiny", **TINY_VARIANTS[name]), rngs=nnx.Rngs(8))
    # Non-trivial norms and biases so a dropped or misplaced tensor shows up.
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(state):
        if path[-1] in ("weight", "q_bias", "k_bias", "v_bias"):
            var[...] = rng.normal(1.0, 0.3, var.shape).astype(np.float32)
    nnx.update(model, state)
    return model


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_tiny_gguf_matches_transformers_reading_the_same_file(name, tmp_path):
    """transformers reads GGUF with llama.cpp's conventions, independently of our writer and loader."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    source = _variant_model(name)
    path = tmp_path / f"{name}.gguf"
    write_gguf(
        path, source.config, model_to_hf_tensors(source), matrix_type=Q.F32, embed_type=Q.F32, pre=PRE_TOKENIZER[name]
    )
    model, tokenizer = models.load_gguf(path)
    assert model.config.architecture == name
    tokens = np.random.default_rng(2).integers(0, 512, (2, 10)).astype(np.int32)
    ours = np.asarray(model(tokens))
    np.testing.assert_array_equal(ours, np.asarray(source(tokens)))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        reference = hf_model(torch.tensor(tokens)).logits.numpy()
    diff = np.abs(ours - reference).max()
    print(f"\n[gguf] tiny {name}: max |logit diff| vs transformers reading the same GGUF {diff:.2e}")
    assert diff < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello there", "Año 2026: 12345 items!", "x = [1, 22, 333]\n\tyield x", "<extra_3>he<extra_4>"]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text


def _write_tokenizer_only_gguf(path, pre):
    byte_chars = _byte_alphabet()
    spell = lambda text: "".join(byte_chars[b] for b in text.encode())  # noqa: E731  (space -> "Ġ")
    pairs = [("1", "2"), ("12", "3"), ("h", "e"), ("he", "l"), ("l", "l"), (" ", "t"), ("t", "h")]
    merges = [f"{spell(a)} {spell(b)}" for a, b in pairs]
    merged = [spell(a + b) for a, b in pairs]
    tokens = byte_chars + merged + ["<|bos|>", "<|eos|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOKENIZER_TEXTS = [
    "hello there, the 123 and 1234567 and 12",
    "  two  spaces\n\nnew\tlines 3.14 héllo",
    "<|bos|>the<|eos|> 999",
    "¿Qué? 2026-11-28 x=[1,22,333]",
]


@pytest.mark.torch
@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_gguf_pre_tokenizers_match_transformers(pre, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tok-{pre}.gguf"
    _write_tokenizer_only_gguf(path, pre)
    fields, _ = models.gguf_loader.read_gguf(path, tensors=False)
    ours = models.Tokenizer.from_gguf_fields(fields, str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ids) == text


def test_digit_rules_differ_by_pre_tokenizer(tmp_path):
    def pieces(pre, text):
        path = tmp_path / f"{pre}.gguf"
        _write_tokenizer_only_gguf(path, pre)
        tok = models.Tokenizer.from_gguf_fields(models.gguf_loader.read_gguf(path, tensors=False)[0])
        return [tok.decode([i]) for i in tok.encode(text)]

    assert pieces("gpt-2", " 1234") == [" ", "123", "4"]  # GPT-2 regex: " 1234" is one pre-token
    assert pieces("llama-bpe", "1234") == ["123", "4"]  # runs of up to three digits
    assert pieces("qwen2", "1234") == ["1", "2", "3", "4"]  # single digits
    assert pieces("smollm", "1234") == ["1", "2", "3", "4"]


@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 12), half=st.integers(1, 40), cols=st.integers(0, 3))
def test_unpermute_inverts_permutation_property(heads, half, cols):
    shape = (heads * 2 * half,) + ((cols,) if cols else ())
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
