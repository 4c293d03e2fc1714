"""The token cache: each split's packed rows, built once on disk and memory-mapped by every later run.

An entry is a directory ``<cache_dir>/<first input>-<key>/`` holding the compact layout of :mod:`train.rows` and
``meta.json`` (row counts, each input's documents and tokens, the skipped rows, how long the build took). Its key
is a SHA-256 of everything the rows depend on: the bytes of every input (a directory: every file in it) and its
format, the tokenizer (its whole ``tokenizer.json``, or the byte tokenizer), the chat template, every packing
setting (``seq_len``, ``pack``, ``add_bos``, ``add_eos``, ``loss_on_prompt``, ``skip_invalid_rows``, ``fields``)
and :data:`FORMAT`. The same key maps the entry at once; any change makes a new entry, so stale rows are never
read. An entry is built in a temporary directory beside it and renamed into place when complete: a killed build
leaves only a ``.tmp-*`` directory, removed by the next build of that key. Builds of one key on one machine take
turns (an ``flock``), so two runs started together tokenize once.

Where: ``data.cache_dir``, by default ``$FINCH_TOKEN_CACHE`` or ``$XDG_CACHE_HOME/finch-train/tokens``
(``~/.cache/finch-train/tokens``): shared by every run of the user, so a sweep over one dataset tokenizes it once.

On object storage (``data.cache_dir=gs://BUCKET/PATH``): rows are memory-mapped, which needs local files, so each
entry is mapped from a local mirror, ``<default dir>/gs-<12 hex digits of the URL's SHA-256>/<entry>``. A hit
downloads the entry from the bucket into the mirror (or finds it there already); a miss builds it in the mirror and
uploads it, ``meta.json`` last, so an entry whose ``meta.json`` is in the bucket is complete.

Several processes (``jax.distributed``): process 0 alone checks the inputs and builds or finds the entry, then
posts its path (or its error) in the coordination service's key-value store; the others wait for that post and map
the same directory, so a local ``data.cache_dir`` must be a directory every host sees (one that does not see it stops
at once with an error that says so). With a ``gs://`` cache every host downloads the entry process 0 found or built
into its own mirror: one build per pod, no shared filesystem needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models import ByteTokenizer, Tokenizer
from train import storage
from train.config import DataConfig
from train.documents import DataError, FieldMap
from train.readers import input_files, input_kind
from train.rows import FILES, CompactRows

__all__ = ["FORMAT", "CacheEntry", "cache_key", "default_dir", "open_or_build", "resolve_dir"]

# Bump when the layout or the rows built from the same inputs change: every older entry is then rebuilt.
FORMAT = 1
WAIT_SECONDS = 6 * 3600  # how long other processes wait for process 0's build
_posts = 0  # multi-process lookups made by this process (each gets its own key-value entry)


def default_dir() -> str:
    """``$FINCH_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/finch-train/tokens`` (``~/.cache/finch-train/tokens``)."""
    if os.environ.get("FINCH_TOKEN_CACHE"):
        return os.environ["FINCH_TOKEN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "finch-train", "tokens")


def resolve_dir(setting: str) -> str:
    """The cache directory ``data.cache_dir`` names (empty: :func:`default_dir`), absolute; a URL as it is."""
    if storage.is_url(setting):
        return setting.rstrip("/")
    return os.path.abspath(os.path.expanduser(setting or default_dir()))


def mirror_dir(location: str) -> str:
    """The local folder that holds the mapped copies of a ``gs://`` cache's entries."""
    return os.path.join(default_dir(), "gs-" + hashlib.sha256(location.encode()).hexdigest()[:12])


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _input_digest(path: str) -> str:
    """SHA-256 of an input's bytes (a directory: of every file's relative name and bytes)."""
    if not os.path.isdir(path):
        return _file_digest(path)
    h = hashlib.sha256()
    for file in input_files(path):
        h.update(f"{os.path.relpath(file, path)}\0{_file_digest(file)}\0".encode())
    return h.hexdigest()


def _tokenizer_identity(tokenizer: Tokenizer | ByteTokenizer) -> dict[str, Any]:
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        return {"tokenizer.json": hashlib.sha256(backend.to_str().encode()).hexdigest(), **specials}
    # The byte tokenizer (and test doubles of it): its class and a probe of its encoding.
    probe = tokenizer.encode("The token cache: é, 漢字, 123.")
    return {"class": type(tokenizer).__qualname__, "vocab": tokenizer.vocab_size, "probe": list(probe), **specials}


def _template_text(tokenizer: Tokenizer | ByteTokenizer, data_cfg: DataConfig) -> str | None:
    """The chat template chats would be rendered with (a missing file is reported when a chat needs it)."""
    if data_cfg.chat_template:
        if os.path.isfile(data_cfg.chat_template):
            with open(data_cfg.chat_template, encoding="utf-8", errors="replace") as f:
                return f.read()
        return f"<missing file {data_cfg.chat_template}>"
    return getattr(tokenizer, "chat_template", None)


def cache_key(
    files: Sequence[str],
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    fields: FieldMap,
    what: str = "training",
) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: the SHA-256 hex key of a split and the JSON-ready description it hashes.

    Raises:
      DataError: a missing or unsupported input.
    """
    inputs = [{"kind": input_kind(path, what), "sha256": _input_digest(path)} for path in files]
    template = _template_text(tokenizer, data_cfg)
    parts = {
        "format": FORMAT,
        "inputs": inputs,
        "tokenizer": _tokenizer_identity(tokenizer),
        "chat_template": None if template is None else hashlib.sha256(template.encode()).hexdigest(),
        "seq_len": data_cfg.seq_len,
        "pack": data_cfg.pack,
        "add_bos": data_cfg.add_bos,
        "add_eos": data_cfg.add_eos,
        "loss_on_prompt": data_cfg.loss_on_prompt,
        "skip_invalid_rows": data_cfg.skip_invalid_rows,
        "fields": fields.describe(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A mapped cache entry: its directory, ``meta.json``, whether this run found it (``hit``) and the rows."""

    path: str
    meta: dict[str, Any]
    hit: bool
    rows: CompactRows
    remote: str | None = None  # the entry in a gs:// cache (``path`` is then its local mirror)

    @property
    def fingerprint(self) -> str:
        """The data's identity for resume checks: the key and the row count, no pass over the tokens."""
        return "cache:" + hashlib.sha256(f"{self.meta['key']}:{self.meta['rows']}".encode()).hexdigest()

    @property
    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, name)) for name in (*FILES, "meta.json"))


def _slug(path: str) -> str:
    name = os.path.basename(os.path.normpath(path)).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "data"


def _read_entry(path: str, key: str, pad_id: int, hit: bool) -> CacheEntry | None:
    """The entry at ``path`` if it is complete and of ``key``, else ``None``."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("key") != key or meta.get("format") != FORMAT:
            return None
        item = np.dtype(meta["token_dtype"]).itemsize
        sizes = {
            "tokens.bin": meta["stream"] * item,
            "mask.bin": (meta["stream"] + 7) // 8,
            "pieces.bin": (meta["pieces"] + 1) * 8,
            "rows.bin": (meta["rows"] + 1) * 8,
        }
        if any(os.path.getsize(os.path.join(path, name)) != size for name, size in sizes.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rows = CompactRows.open(path, meta["seq_len"], pad_id, meta["token_dtype"], max_id=meta["max_id"])
    return CacheEntry(path, meta, hit, rows)


def _build_lock(cache_dir: str, name: str) -> contextlib.AbstractContextManager[None]:
    """One builder of ``name`` at a time on this machine."""
    return storage.host_lock(os.path.join(cache_dir, f".{name}.lock"))


def _local(
    cache_dir: str,
    key: str,
    name: str,
    pad_id: int,
    build: Callable[[str], dict[str, Any]],
) -> CacheEntry:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the token cache directory {cache_dir}: {e.strerror}; set data.cache_dir") from e
    final = os.path.join(cache_dir, name)
    found = _read_entry(final, key, pad_id, hit=True)
    if found is not None:
        return found
    try:
        return _build_entry(cache_dir, final, name, key, pad_id, build)
    except OSError as e:  # an unwritable directory, a full disk: one line, as for any bad input
        raise DataError(
            f"cannot build the token cache entry {final}: {e.strerror or e}; free space or set data.cache_dir to "
            "another directory"
        ) from e


def _build_entry(
    cache_dir: str, final: str, name: str, key: str, pad_id: int, build: Callable[[str], dict[str, Any]]
) -> CacheEntry:
    with _build_lock(cache_dir, name):
        found = _read_entry(final, key, pad_id, hit=True)  # built by another run while this one waited
        if found is not None:
            return found
        for stale in os.listdir(cache_dir):  # left by killed builds of this key (none runs: the lock is held)
            if stale.startswith(f".tmp-{name}-"):
                shutil.rmtree(os.path.join(cache_dir, stale), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir)
        try:
            start = time.perf_counter()
            meta = build(tmp)
            seconds = time.perf_counter() - start
            meta.update(
                key=key,
                format=FORMAT,
                build_seconds=round(seconds, 3),
                built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                built_on=socket.gethostname(),
            )
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            os.chmod(tmp, 0o755)
            if os.path.isdir(final):  # an incomplete or foreign entry under this name: replaced whole
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    entry = _read_entry(final, key, pad_id, hit=False)
    if entry is None:
        raise DataError(f"the token cache entry {final} was written but does not read back; is the disk full?")
    return entry


def open_or_build(
    cache_dir: str,
    files: Sequence[str],
    key: Callable[[], str],
    pad_id: int,
    build: Callable[[str], dict[str, Any]],
) -> CacheEntry:
    """The entry of ``key()``, built with ``build(directory)`` (which writes the layout and returns the rest of
    ``meta.json``) when missing. With several processes only process 0 calls ``key`` and ``build``.

    Raises:
      DataError: from ``key``/``build`` (on every process), or the entry is not visible to this process.
    """
    from jax._src import distributed  # the coordination service of jax.distributed, without starting a backend

    def find_or_build() -> CacheEntry:
        k = key()
        name = f"{_slug(files[0])}-{k[:20]}"
        if storage.is_url(cache_dir):
            return _remote(cache_dir, k, name, pad_id, build)
        return _local(cache_dir, k, name, pad_id, build)

    state = distributed.global_state
    if state.client is None or (state.num_processes or 1) == 1:
        return find_or_build()
    global _posts
    _posts += 1
    client, process = state.client, state.process_id
    post = f"finch_train/token_cache/{_posts}"
    if process == 0:
        try:
            entry = find_or_build()
        except BaseException as e:
            client.key_value_set(post, json.dumps({"error": str(e) if isinstance(e, DataError) else repr(e)}))
            raise
        client.key_value_set(post, json.dumps({"path": entry.remote or entry.path, "key": entry.meta["key"]}))
        return entry
    try:
        answer = json.loads(client.blocking_key_value_get(post, WAIT_SECONDS * 1000))
    except Exception as e:  # the coordination service's timeout or a lost process 0
        raise DataError(
            f"process {process} waited for process 0 to build the token cache in {cache_dir} and got no answer ({e})"
        ) from None
    if "error" in answer:
        raise DataError(answer["error"])
    if storage.is_url(answer["path"]):
        return _fetch(cache_dir, answer["key"], answer["path"].rsplit("/", 1)[1], pad_id)
    entry = _read_entry(answer["path"], answer["key"], pad_id, hit=True)
    if entry is None:
        raise DataError(
            f"process {process} on {socket.gethostname()} cannot read the token cache entry "
            f"{answer['path']} that process 0 built: data.cache_dir must be a directory every host sees "
            "(a shared filesystem)"
        )
    return entry


def _fetch(cache_dir: str, key: str, name: str, pad_id: int) -> CacheEntry:
    """The ``gs://`` entry ``name`` mapped from this host's mirror, downloaded first unless the mirror has it.

    Raises:
      DataError: the bucket has no complete entry of ``key`` under ``name``.
    """
    mirror, remote = mirror_dir(cache_dir), storage.join(cache_dir, name)
    local = os.path.join(mirror, name)
    found = _read_entry(local, key, pad_id, hit=True)
    if found is None:
        if not storage.exists(storage.join(remote, "meta.json")):
            raise DataError(f"the token cache entry {remote} is not in the bucket (or has no meta.json yet)")
        os.makedirs(mirror, exist_ok=True)
        with _build_lock(mirror, name):
            found = _read_entry(local, key, pad_id, hit=True)
            if found is None:
                tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=mirror)
                try:
                    storage.download_folder(remote, tmp)
                    if os.path.isdir(local):
                        shutil.rmtree(local)
                    os.rename(tmp, local)
                except OSError as e:
                    raise DataError(f"cannot download the token cache entry {remote} to {local}: {e}") from None
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                found = _read_entry(local, key, pad_id, hit=True)
    if found is None:
        raise DataError(f"the token cache entry {remote} is incomplete or not of this data (its meta.json differs)")
    return dataclasses.replace(found, remote=remote)


def _remote(cache_dir: str, key: str, name: str, pad_id: int, build: Callable[[str], dict[str, Any]]) -> CacheEntry:
    """A ``gs://`` cache's entry: downloaded when the bucket has it, else built in the local mirror and uploaded."""
    remote = storage.join(cache_dir, name)
    meta = storage.join(remote, "meta.json")
    try:
        in_bucket = storage.exists(meta) and json.loads(storage.read_text(meta)).get("key") == key
        if in_bucket:
            return _fetch(cache_dir, key, name, pad_id)
        entry = _local(mirror_dir(cache_dir), key, name, pad_id, build)
        storage.upload_folder(entry.path, remote, last="meta.json")
    except (OSError, ValueError) as e:  # gcsfs raises OSError subclasses; a half-written meta.json is a ValueError
        raise DataError(f"the token cache in {cache_dir}: {type(e).__name__}: {e}") from None
    return dataclasses.replace(entry, remote=remote)
