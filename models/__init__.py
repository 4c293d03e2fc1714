"""Flax NNX decoder LMs (Llama / Qwen2 / Qwen3 / SmolLM2) with Hugging Face and GGUF checkpoint import.

The public surface is listed in ``docs/interfaces.md`` ("models") and ``docs/models.md``:

    model, tokenizer = models.load("gguf:smollm2")             # or "hf:DIR", "gguf:PATH", "preset:tiny"
    cfg = models.get_preset("tiny")
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, positions=None, segment_ids=None)   # float32 [B, T, vocab]
    models.logical_axes(model)                                  # axis-name tuples per parameter
    model, tokenizer = models.load_gguf(models.smollm2_gguf_path())
    model, tokenizer = models.load_hf(directory)
    models.save_hf(model, tokenizer, directory)
    models.generate(model, [tokenizer.encode("Hi")], 20)
"""

from models.config import PRESETS, ConfigError, ModelConfig, RopeScaling, get_preset
from models.generate import generate, generate_stream
from models.gguf_loader import GGUFError, load_gguf, smollm2_gguf_path
from models.hf import HFDirectoryError, load_hf, save_hf
from models.load import ModelSource, load, load_config, parse_source
from models.tokenizer import ByteTokenizer, Tokenizer, TokenizerError
from models.transformer import CausalLM, KVCache, init_cache, logical_axes, rope_inverse_frequencies
from models.weights import WeightError, abstract_model

__all__ = [
    "load",
    "load_config",
    "parse_source",
    "ModelSource",
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "get_preset",
    "CausalLM",
    "KVCache",
    "init_cache",
    "logical_axes",
    "rope_inverse_frequencies",
    "generate",
    "generate_stream",
    "load_gguf",
    "smollm2_gguf_path",
    "GGUFError",
    "load_hf",
    "save_hf",
    "HFDirectoryError",
    "Tokenizer",
    "ByteTokenizer",
    "TokenizerError",
    "WeightError",
    "abstract_model",
]
