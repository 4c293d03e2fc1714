"""Models from the Hugging Face Hub by repo id: ``hub:Qwen/Qwen3-0.6B`` or ``hub:Qwen/Qwen3-0.6B@REVISION``.

:func:`snapshot` asks ``huggingface_hub`` for a local snapshot of the repository's config, tokenizer and safetensors
files (nothing else: no PyTorch ``.bin`` files, no ONNX or GGUF copies) and returns its folder, which then loads as
``hf:DIR`` does. ``huggingface_hub`` keeps its own cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``),
so a model is downloaded once; with ``HF_HUB_OFFLINE=1`` nothing is fetched and only cached snapshots load. Gated
and private repositories use the token of ``hf auth login`` (or ``HF_TOKEN``).

``huggingface_hub`` is imported only here, and only when a ``hub:`` model is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from models.config import ConfigError

__all__ = ["CONFIG_FILES", "TOKENIZER_FILES", "WEIGHT_FILES", "HubRef", "looks_like_repo_id", "parse_ref", "snapshot"]

# What a model needs, in huggingface_hub's allow_patterns (fnmatch) syntax.
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]

# The Hub's repo ids: NAME or NAMESPACE/NAME, letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 chars.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
EXAMPLE = "hub:Qwen/Qwen3-0.6B"


class HubRef(NamedTuple):
    """A Hub model: ``revision`` is ``None`` for the repository's default branch."""

    repo_id: str
    revision: str | None = None


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub repo id with a namespace (``Qwen/Qwen3-0.6B``).

    >>> looks_like_repo_id("Qwen/Qwen3-0.6B"), looks_like_repo_id("/models/qwen"), looks_like_repo_id("runs/x/hf/")
    (True, False, False)
    """
    return "/" in text and _valid_repo_id(text.partition("@")[0])


def _valid_repo_id(repo_id: str) -> bool:
    return len(repo_id) <= 96 and "--" not in repo_id and ".." not in repo_id and bool(_REPO_ID.fullmatch(repo_id))


def parse_ref(value: str) -> HubRef:
    """``REPO_ID[@REVISION]`` (the part after ``hub:``) as a :class:`HubRef`.

    >>> parse_ref("Qwen/Qwen3-0.6B")
    HubRef(repo_id='Qwen/Qwen3-0.6B', revision=None)
    >>> parse_ref("Qwen/Qwen3-0.6B@v1.0").revision
    'v1.0'

    Raises:
      ConfigError: not a repo id, or an empty revision.
    """
    repo_id, at, revision = value.partition("@")
    if not _valid_repo_id(repo_id):
        raise ConfigError(
            f"model hub:{value}: {repo_id!r} is not a Hugging Face Hub repo id (NAMESPACE/NAME of letters, digits, "
            f"'-', '_' and '.', e.g. {EXAMPLE}, optionally @REVISION); for a local directory use hf:DIR"
        )
    if at and not revision:
        raise ConfigError(f"model hub:{value}: empty revision after '@' (a branch, tag or commit, e.g. @main)")
    return HubRef(repo_id, revision or None)


def snapshot(value: str, *, weights: bool = True) -> Path:
    """The local folder of the Hub model ``REPO_ID[@REVISION]``, downloaded into huggingface_hub's cache if needed.

    Args:
      value: the part of ``hub:REPO_ID[@REVISION]`` after ``hub:``.
      weights: also fetch the safetensors weights and the tokenizer (``False``: the config only, for compiles and
        sizes).

    Raises:
      ConfigError: a malformed id, huggingface_hub missing, or a repository, revision or file that cannot be had
        (offline and not cached, not on the Hub, gated) -- each with what to do about it.
    """
    ref = parse_ref(value)
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ConfigError(
            f"model hub:{value} needs the huggingface_hub package: `pip install -c constraints.txt huggingface_hub` "
            "(`make install` installs it)"
        ) from None
    patterns = CONFIG_FILES + (TOKENIZER_FILES + WEIGHT_FILES if weights else [])
    name = f"hub:{value}"
    try:
        folder = huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
    except errors.GatedRepoError:
        raise ConfigError(
            f"model {name}: the repository is gated; accept its licence on huggingface.co/{ref.repo_id} and log in "
            "(`hf auth login` or HF_TOKEN=...)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(
            f"model {name}: no such repository on the Hub (or it is private: log in with `hf auth login` or "
            "HF_TOKEN=...)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ConfigError(f"model {name}: the repository has no revision {ref.revision!r}") from None
    except errors.LocalEntryNotFoundError as e:
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            reason = f"HF_HUB_OFFLINE is set and it is not in the cache {cache}"
        else:
            reason = f"the Hub cannot be reached and it is not in the cache {cache}"
        raise ConfigError(
            f"model {name}: {reason}; download it once on a machine with network access: "
            f"`hf download {ref.repo_id}{f' --revision {ref.revision}' if ref.revision else ''}` (with the same "
            f"HF_HUB_CACHE), then run again ({type(e).__name__})"
        ) from None
    except errors.HFValidationError as e:
        raise ConfigError(f"model {name}: {e}") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model {name}: the snapshot {folder} has no config.json (is it a model repository? this stack loads "
            "Llama / Qwen2 / Qwen3 / SmolLM2 models in safetensors)"
        )
    return folder
