"""Tokenizers for the models package: HF ``tokenizer.json``, GGUF metadata, and a byte-level toy for tests.

All three share the small interface the training code uses::

    tokenizer.encode(text, add_bos=False) -> list[int]
    tokenizer.decode(ids) -> str
    tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

__all__ = ["Tokenizer", "ByteTokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer file or GGUF tokenizer description that cannot be used faithfully."""


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# GGUF token_type values (llama.cpp's llama_token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# How llama.cpp splits text before BPE, keyed by `tokenizer.ggml.pre`. Only rules that reduce to pre-tokenizers of
# the `tokenizers` library exactly are listed; anything else is refused rather than tokenized slightly differently.
#   gpt2 family: the GPT-2 regex.  smollm/starcoder family: every digit is its own pre-token, then the GPT-2 regex.
#   qwen2 / llama-bpe: their own split regex, then the byte-level mapping.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_GGUF_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "starcoder": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    # Qwen2/Qwen3: single digits; Llama-3: digit runs of up to three.
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token ids a causal LM needs.

    Args:
      backend: the Rust tokenizer (BPE model, pre-tokenizer, decoder, added tokens).
      bos_id, eos_id, pad_id: special token ids (``pad_id`` defaults to ``eos_id``).
      chat_template: the Jinja chat template, kept so an export can write it back.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in the text map to their ids)."""
        return self.encode_batch([text], add_bos=add_bos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Token ids of each text, tokenized in parallel by the Rust backend."""
        if add_bos and self.bos_id is None:
            raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
        head = [self.bos_id] if add_bos else []
        return [head + e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ----------------------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """Reads ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``config.json`` for special tokens)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (a fast-tokenizer file is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error is precise but does not name the file
            raise TokenizerError(f"{path}: cannot be parsed by the tokenizers library: {e}") from None
        tok_cfg = _read_json(directory / "tokenizer_config.json")
        model_cfg = _read_json(directory / "config.json")
        gen_cfg = _read_json(directory / "generation_config.json")

        def special(name: str) -> int | None:
            content = _token_content(tok_cfg.get(f"{name}_token"))
            if content is not None:
                token_id = backend.token_to_id(content)
                if token_id is None:
                    raise TokenizerError(
                        f"{directory / 'tokenizer_config.json'}: {name}_token {content!r} is not in the vocab"
                    )
                return token_id
            for source in (gen_cfg, model_cfg):
                value = source.get(f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
            return None

        return cls(
            backend,
            bos_id=special("bos"),
            eos_id=special("eos"),
            pad_id=special("pad"),
            chat_template=tok_cfg.get("chat_template"),
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], source: str = "GGUF") -> Tokenizer:
        """Builds the byte-level BPE tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata.

        Args:
          fields: metadata key -> Python value (strings, ints, lists), as read from the GGUF.
          source: file name for error messages.
        """
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE 'gpt2')"
            )
        pre = fields.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(_GGUF_PRE_TOKENIZERS)}"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in fields:
                raise TokenizerError(f"{source}: metadata field {key!r} is missing")
        tokens = list(fields["tokenizer.ggml.tokens"])
        token_types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")
        merges = []
        for merge in fields["tokenizer.ggml.merges"]:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
            merges.append((left, right))
        try:
            backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as e:  # e.g. a merge whose parts or result are not in the vocab
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens/merges do not form a valid BPE: {e}") from None
        backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == _GGUF_CONTROL
        ]
        user = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == _GGUF_USER_DEFINED
        ]
        backend.add_special_tokens(specials)
        backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise TokenizerError(
                f"{source}: built vocab has {backend.get_vocab_size()} entries, metadata lists {len(tokens)}"
            )

        def special(key: str) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        return cls(
            backend,
            bos_id=special("bos_token_id"),
            eos_id=special("eos_token_id"),
            pad_id=special("padding_token_id"),
            chat_template=fields.get("tokenizer.chat_template"),
        )

    def save(self, directory: str | Path) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        for name, token_id in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if token_id is not None:
                config[f"{name}_token"] = self.backend.id_to_token(token_id)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS=256, EOS=257, PAD=258; fits the ``tiny`` preset (vocab 512).

    Example:
      >>> tok = ByteTokenizer()
      >>> tok.decode(tok.encode("héllo", add_bos=True))
      'héllo'
    """

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259
    chat_template = None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        return [self.encode(text, add_bos=add_bos) for text in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        del skip_special_tokens  # specials never decode to text
        return bytes(i for i in (int(x) for x in ids) if i < 256).decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
