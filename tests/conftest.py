"""Shared test set-up.

Eight simulated CPU devices let the sharding tests build real meshes on a laptop or CI box. The flag must be set
before jax is imported anywhere, which is why it lives at the top of conftest.

Compiled programs go to a persistent JAX compilation cache in ``.cache/jax-tests`` (git-ignored), shared by the
pytest-xdist workers and by the CLI subprocesses the tests start (they inherit the environment): the same tiny
train step is compiled by dozens of processes, and XLA:CPU's compile dominates their time. A cache entry is keyed
by the program, the compile options, the devices and the jax/jaxlib version, so a hit runs the same executable a
fresh compile would build. ``FINCH_TEST_JAX_CACHE=`` (empty) turns it off.

Token caches (``train.token_cache``) go to a temporary directory of the session (``FINCH_TOKEN_CACHE``, inherited by
the xdist workers and subprocesses), removed at exit, never to the user's ``~/.cache``.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_cache = os.environ.get("FINCH_TEST_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"))
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

if not os.environ.get("FINCH_TOKEN_CACHE"):
    _tokens = tempfile.mkdtemp(prefix="finch-test-tokens-")
    os.environ["FINCH_TOKEN_CACHE"] = _tokens
    atexit.register(shutil.rmtree, _tokens, ignore_errors=True)
