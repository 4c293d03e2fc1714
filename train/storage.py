"""One path layer for everything a run reads or writes: local paths, and ``gs://`` (Google Cloud Storage) URLs.

Checkpoints go through orbax, which speaks ``gs://`` itself (``etils.epath`` for its small files, tensorstore for
the arrays): :class:`train.checkpoint.Checkpointer` hands it the URL unchanged. Every other file goes through this
module, so the run folder, the data files and the token cache accept the same URLs:

* :func:`check` refuses a location that cannot work — an unknown scheme (``s3://``, a typo), ``gs://`` without the
  ``gcs`` extra installed, an emulator half configured, a bucket that does not exist — as a :class:`StorageError`
  (a ``ConfigError``: exit 2), before any model is loaded.
* :func:`join`, :func:`exists`, :func:`read_text`, :func:`write_text`, :func:`path` work on both kinds.
* :func:`local_copy` is how data is read from a URL: the readers (JSONL, parquet, ``datasets`` directories, the
  tokenizer's batch encoder) want local files, so a ``gs://`` input is downloaded once into :func:`download_dir` and
  read there; a later run downloads it again only when the object changed (its size or generation differ).
* :func:`upload_folder` / :func:`download_folder` move a folder of files whole (the token cache's entries).
* :class:`StagedFolder` is how a run folder lives on object storage. Object stores cannot append, and
  ``metrics.jsonl`` and TensorBoard's event files grow by appending, so a ``gs://`` run folder is written in a local
  *staging folder* (``$TMPDIR/finch-stage-<hash of the URL>``), and :meth:`StagedFolder.push` uploads every file
  that changed since the last push — before each checkpoint save, after each export and at the end. The staging
  folder is deleted when the run ends; one left by a killed run is emptied and refilled from the bucket when the
  run resumes (the bucket is the truth). An object upload is atomic: a reader sees the old object or the new one.

``gs://`` needs the ``gcs`` extra (``pip install -e '.[gcs]'``: gcsfs and google-cloud-storage) and Google
credentials (``gcloud auth application-default login``, or a TPU/GCE VM's service account). Tests point every client
at a local emulator with :data:`EMULATOR_ENV` and ``STORAGE_EMULATOR_HOST`` / ``TENSORSTORE_GCS_HTTP_URL``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from models.config import ConfigError

__all__ = [
    "EMULATOR_ENV",
    "download_dir",
    "download_folder",
    "local_copy",
    "upload_folder",
    "StagedFolder",
    "StorageError",
    "check",
    "exists",
    "is_url",
    "join",
    "path",
    "read_text",
    "write_text",
]

SCHEMES = ("gs",)  # object stores this project supports (and tests) besides local paths

# What an emulator needs besides STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL
# (tensorstore, i.e. orbax's arrays): no credential search and no cached listings. Tests set these.
EMULATOR_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs >= 2026: else a gRPC bucket-type probe that stalls 60 s
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
    "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",  # gcsfs: see objects other processes wrote
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed bearer token, no credential search
    "NO_GCE_CHECK": "true",  # google-auth: never probe the GCE metadata server
}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ConfigError):
    """A location that cannot be used: an unsupported scheme, a missing extra, a bucket that does not exist."""


def scheme(location: str) -> str | None:
    """``"gs"`` for ``gs://b/x``, ``None`` for a local path."""
    m = _URL.match(str(location))
    return m.group(1).lower() if m else None


def is_url(location: str) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return scheme(location) is not None


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URLs (never made absolute or normalised)."""
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


_configured_for: list[str | None] = []  # the STORAGE_EMULATOR_HOST the options were set for


def _configure() -> None:
    """gcsfs options for every user of ``gs://`` in this process (this module, epath, orbax), set once.

    Listings are never cached (another process's objects must be seen: a resumed run's checkpoints, a lock). With an
    emulator (``STORAGE_EMULATOR_HOST``), gcsfs's plain ``GCSFileSystem`` is used: its default in gcsfs >= 2026 first
    asks the storage-control gRPC API for the bucket's type, which an emulator does not serve (a 60 s stall per
    bucket). Against real GCS nothing changes there.
    """
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if _configured_for == [emulator]:
        return
    import fsspec

    options = fsspec.config.conf.setdefault("gcs", {})
    options["use_listings_cache"] = False
    if emulator:
        import gcsfs.core

        options.setdefault("token", "anon")
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    _configured_for[:] = [emulator]


def path(location: str) -> Any:
    """An ``etils.epath.Path`` (pathlib-like, gcsfs behind ``gs://``)."""
    from etils import epath

    if is_url(location):
        _configure()
    return epath.Path(location)


def exists(location: str) -> bool:
    return os.path.exists(location) if not is_url(location) else path(location).exists()


def read_text(location: str) -> str:
    if not is_url(location):
        with open(location, encoding="utf-8") as f:
            return f.read()
    return path(location).read_text()


def write_text(location: str, text: str) -> None:
    """Writes a whole file (a single object upload on ``gs://``: readers never see half of it)."""
    if not is_url(location):
        with open(location, "w", encoding="utf-8") as f:
            f.write(text)
        return
    path(location).write_text(text)


def _gcs_filesystem() -> Any:
    import fsspec

    _configure()
    return fsspec.filesystem("gs")


def check(location: str, what: str) -> None:
    """Refuses ``location`` (a setting named ``what``, e.g. ``output.dir``) if it cannot be written.

    Local paths pass (the run lock reports an unwritable one). ``gs://`` passes once the bucket is found.

    Raises:
      StorageError: another scheme, the ``gcs`` extra missing, the emulator half configured, no credentials, or no
        such bucket.
    """
    kind = scheme(location)
    if kind is None:
        return
    if kind not in SCHEMES:
        raise StorageError(
            f"{what}={location!r}: {kind}:// is not supported; use a local path or gs://BUCKET/PATH (Google Cloud "
            "Storage)"
        )
    try:
        import gcsfs  # noqa: F401
        import google.cloud.storage  # noqa: F401
    except ImportError as e:
        raise StorageError(
            f"{what}={location!r}: gs:// needs the gcs extra ({e.name} is not installed); run "
            "`pip install -e '.[gcs]'` in the finch-optax checkout"
        ) from None
    emulator = [k for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL") if os.environ.get(k)]
    if len(emulator) == 1:
        other = "TENSORSTORE_GCS_HTTP_URL" if emulator[0] == "STORAGE_EMULATOR_HOST" else "STORAGE_EMULATOR_HOST"
        raise StorageError(
            f"{what}={location!r}: {emulator[0]} is set but {other} is not; set both to the emulator's URL (orbax's "
            "arrays go through tensorstore, which reads only TENSORSTORE_GCS_HTTP_URL), or neither for real GCS"
        )
    _configure()
    bucket = location.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{what}={location!r}: no bucket; write gs://BUCKET/PATH")
    if not emulator:
        try:
            import google.auth

            google.auth.default()
        except Exception as e:
            raise StorageError(
                f"{what}={location!r}: no Google credentials ({str(e).splitlines()[0]}); run `gcloud auth "
                "application-default login`, or run on a VM whose service account can write the bucket"
            ) from None
    try:
        found = _gcs_filesystem().exists(bucket)
    except Exception as e:
        raise StorageError(f"{what}={location!r}: cannot reach bucket {bucket}: {type(e).__name__}: {e}") from None
    if not found:
        raise StorageError(f"{what}={location!r}: bucket {bucket} does not exist (or these credentials cannot see it)")


class StagedFolder:
    """A ``gs://`` run folder written through a local staging folder (see the module docstring).

    ``local`` is where the run writes; :meth:`pull` fills it from the bucket, :meth:`push` uploads what changed,
    :meth:`close` pushes and deletes it. A local ``remote`` is used in place (``local == remote``; push is a no-op).
    """

    PULLED = ("metrics.jsonl", "config.yaml", "wandb_run_id")  # what a resumed run appends to or compares with

    def __init__(self, remote: str):
        self.remote = remote
        self.staged = is_url(remote)
        if self.staged:
            digest = hashlib.sha256(remote.rstrip("/").encode()).hexdigest()[:12]
            self.local = os.path.join(tempfile.gettempdir(), f"finch-stage-{digest}")
        else:
            self.local = remote
        self._seen: dict[str, tuple[int, int]] = {}

    def remote_path(self, *parts: str) -> str:
        return join(self.remote, *parts)

    def pull(self) -> list[str]:
        """Empties the staging folder (a killed run's leftovers) and downloads :attr:`PULLED` files that exist."""
        if not self.staged:
            os.makedirs(self.local, exist_ok=True)
            return []
        shutil.rmtree(self.local, ignore_errors=True)
        os.makedirs(self.local)
        got = []
        for name in self.PULLED:
            src = path(self.remote_path(name))
            if src.exists():
                dst = os.path.join(self.local, name)
                with open(dst, "wb") as f:
                    f.write(src.read_bytes())
                st = os.stat(dst)
                self._seen[dst] = (st.st_size, st.st_mtime_ns)  # already in the bucket
                got.append(name)
        return got

    def push(self) -> int:
        """Uploads every staged file that is new or changed since the last push; returns how many."""
        if not self.staged or not os.path.isdir(self.local):
            return 0
        fs = _gcs_filesystem()
        target = self.remote.split("://", 1)[1].rstrip("/")
        n = 0
        for root, _, files in os.walk(self.local):
            for name in sorted(files):
                src = os.path.join(root, name)
                st = os.stat(src)
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(src) == key:
                    continue
                fs.put_file(src, target + "/" + os.path.relpath(src, self.local).replace(os.sep, "/"))
                self._seen[src] = key
                n += 1
        return n

    def close(self) -> None:
        """Pushes what is left, then deletes the staging folder (kept if the push fails: nothing is lost)."""
        if not self.staged:
            return
        self.push()
        shutil.rmtree(self.local, ignore_errors=True)


# -- data read from object storage: a local copy, downloaded once ------------------------------------------------------


def download_dir() -> str:
    """Where :func:`local_copy` keeps downloaded inputs: ``$FINCH_DOWNLOADS``, else
    ``$XDG_CACHE_HOME/finch-train/downloads`` (``~/.cache/finch-train/downloads``)."""
    if os.environ.get("FINCH_DOWNLOADS"):
        return os.environ["FINCH_DOWNLOADS"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "finch-train", "downloads")


def _bare(location: str) -> str:
    """``bucket/path`` of ``gs://bucket/path/`` (what gcsfs takes)."""
    return location.split("://", 1)[1].rstrip("/")


def _objects(location: str) -> dict[str, dict[str, Any]]:
    """``{relative name: {size, generation}}`` of the object ``location`` (name ``""``) or of every object under it."""
    fs = _gcs_filesystem()
    target = _bare(location)
    if fs.isfile(target):
        info = fs.info(target)
        return {"": {"size": info["size"], "generation": str(info.get("generation", info.get("md5Hash", "")))}}
    found = fs.find(target, detail=True)
    return {
        name[len(target) + 1 :]: {
            "size": info["size"],
            "generation": str(info.get("generation", info.get("md5Hash", ""))),
        }
        for name, info in sorted(found.items())
        if info.get("type") != "directory"
    }


_copies: dict[str, str] = {}  # URL -> its local copy, checked against the bucket once per process


def local_copy(location: str, root: str | None = None) -> str:
    """A local path with ``location``'s bytes: ``location`` itself when it is local; for a ``gs://`` object (or a
    folder of objects, e.g. a ``datasets`` directory) a copy in ``root`` (default :func:`download_dir`), named
    ``<12 hex digits of the URL's SHA-256>/<its last name>`` so that error messages still name the file.

    The copy is reused while every object has the size and generation recorded when it was downloaded; otherwise it
    is downloaded again, into a temporary folder renamed into place (a killed download leaves no half copy).

    Raises:
      StorageError: nothing exists at ``location``, or it cannot be read.
    """
    if not is_url(location):
        return location
    if location in _copies:
        return _copies[location]
    try:
        objects = _objects(location)
    except Exception as e:
        raise StorageError(f"{location}: cannot list it ({type(e).__name__}: {e})") from None
    if not objects:
        raise StorageError(f"{location} does not exist")
    digest = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:12]
    home = os.path.join(root or download_dir(), digest)
    local = os.path.join(home, os.path.basename(_bare(location)) or "data")
    stamp = os.path.join(home, "objects.json")
    try:
        os.makedirs(home, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{location}: cannot create {home} for its local copy ({e.strerror})") from None
    # Processes of one host (a pod's, or two runs) check and download in turn: none replaces a copy another reads.
    with host_lock(os.path.join(home, ".lock")):
        try:
            with open(stamp, encoding="utf-8") as f:
                fresh = json.load(f) == objects and os.path.exists(local)
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            _download(location, objects, home, local, stamp)
    _copies[location] = local
    return local


@contextlib.contextmanager
def host_lock(path: str) -> Iterator[None]:
    """Processes of this machine hold ``path``'s lock one at a time (best effort where the filesystem has no flock)."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _download(location: str, objects: dict[str, dict[str, Any]], home: str, local: str, stamp: str) -> None:
    fs = _gcs_filesystem()
    tmp = tempfile.mkdtemp(prefix=".download-", dir=home)
    try:
        target = os.path.join(tmp, "x")
        for name in objects:
            dst = os.path.join(target, *name.split("/")) if name else target
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(_bare(location) + ("/" + name if name else ""), dst)
        if os.path.isdir(local):
            shutil.rmtree(local)
        elif os.path.exists(local):
            os.remove(local)
        os.rename(target, local)
        with open(stamp, "w", encoding="utf-8") as f:
            json.dump(objects, f)
    except OSError as e:
        raise StorageError(f"{location}: cannot download it to {home} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(local: str, location: str, last: str | None = None) -> None:
    """Uploads every file under ``local`` to ``location`` (a ``gs://`` folder); ``last`` (a file name) goes last, so
    a reader that waits for it sees every other file."""
    fs = _gcs_filesystem()
    names = sorted(os.path.relpath(os.path.join(r, n), local) for r, _, files in os.walk(local) for n in files)
    names.sort(key=lambda n: n == last)
    for name in names:
        fs.put_file(os.path.join(local, name), _bare(location) + "/" + name.replace(os.sep, "/"))


def download_folder(location: str, local: str) -> None:
    """Downloads every object under ``location`` into ``local`` (created; files there are replaced)."""
    fs = _gcs_filesystem()
    for name in _objects(location):
        dst = os.path.join(local, *name.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(_bare(location) + "/" + name, dst)
