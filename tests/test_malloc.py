"""train/malloc.py: which allocator ``finch-train`` re-executes itself with, and that the re-exec really preloads it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train import malloc

ROOT = Path(__file__).resolve().parent.parent
TCMALLOC = "/lib/libtcmalloc_minimal.so.4"
JEMALLOC = "/lib/libjemalloc.so.2"


def _finder(*present: str):
    paths = {"tcmalloc": TCMALLOC, "jemalloc": JEMALLOC}
    return lambda name: paths[name] if name in present else None


@pytest.mark.parametrize(
    "env, present, platform, chosen",
    [
        ({}, ("tcmalloc", "jemalloc"), "linux", "tcmalloc"),  # auto: tcmalloc first
        ({}, ("jemalloc",), "linux", "jemalloc"),
        ({}, (), "linux", None),  # auto with nothing installed: the system malloc, silently
        ({"FINCH_MALLOC": "system"}, ("tcmalloc",), "linux", None),
        ({"FINCH_MALLOC": "jemalloc"}, ("tcmalloc", "jemalloc"), "linux", "jemalloc"),
        ({}, ("tcmalloc",), "darwin", None),  # LD_PRELOAD is Linux's
        ({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, ("tcmalloc",), "linux", None),  # the user's own choice stands
        ({malloc.CHOSEN_ENV: "system"}, ("tcmalloc",), "linux", None),  # already re-executed once
    ],
)
def test_plan_chooses(env, present, platform, chosen):
    plan = malloc.plan(env, platform=platform, find=_finder(*present))
    assert (plan and plan.name) == chosen
    if plan is not None:
        assert plan.env["LD_PRELOAD"].split()[0] == plan.library
        assert plan.env[malloc.CHOSEN_ENV] == chosen


@pytest.mark.parametrize(
    "value, match",
    [
        ("tcmalloc", r"libtcmalloc_minimal\.so\.4 or .* not found .*apt-get install libgoogle-perftools4"),
        ("jemalloc", r"apt-get install libjemalloc2.*FINCH_MALLOC=system"),
        ("mimalloc", r"expected auto, system, tcmalloc, jemalloc or the path"),
        ("/nowhere/libtcmalloc.so", "no such file"),
    ],
)
def test_plan_refuses_what_it_cannot_honour(value, match):
    with pytest.raises(malloc.MallocError, match=match):
        malloc.plan({"FINCH_MALLOC": value}, platform="linux", find=_finder())


def test_preload_env_swaps_the_allocator_and_keeps_other_preloads():
    env = {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4 /x/libfoo.so", "PATH": "/bin"}
    assert malloc.preload_env(env, "jemalloc", JEMALLOC)["LD_PRELOAD"] == f"{JEMALLOC} /x/libfoo.so"
    system = malloc.preload_env(env, "system", None)
    assert system["LD_PRELOAD"] == "/x/libfoo.so" and system[malloc.CHOSEN_ENV] == "system"
    assert "LD_PRELOAD" not in malloc.preload_env({"LD_PRELOAD": TCMALLOC}, "system", None)
    assert malloc.describe({"LD_PRELOAD": f"/x/libfoo.so:{JEMALLOC}"}) == "jemalloc"
    assert malloc.describe({}) == "system"


_PROBE = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from train.malloc import CHOSEN_ENV, reexec_with_chosen_malloc, release_free_memory
    reexec_with_chosen_malloc()
    blocks = [bytearray(64 << 20) for _ in range(4)]
    del blocks
    release_free_memory()  # the allocator's own call (tcmalloc, jemalloc or glibc): it must not crash
    maps = open("/proc/self/maps").read()
    print(os.environ.get(CHOSEN_ENV), {library!r} in maps, os.environ.get("LD_PRELOAD", ""))
    """
)


def _run_probe(tmp_path: Path, library: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(_PROBE.format(root=str(ROOT), library=library))
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.CHOSEN_ENV, malloc.ENV)}
    return subprocess.run(
        [sys.executable, str(script), "--some", "arg"], env=base | env, capture_output=True, text=True, timeout=60
    )


def _mapped_library(name: str) -> str:
    """The path of a shared library this process has mapped (every Linux Python maps the C math library)."""
    paths = (line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines())
    found = next((path for path in paths if Path(path).name.startswith(name)), None)
    if found is None:  # not Linux, or a static Python
        pytest.skip(reason=f"no {name} mapped in this process")
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexec_preloads_the_named_library_once(tmp_path):
    """The re-exec with a library given by path, on any Linux box: the new process has it mapped and is not
    re-executed again (a loop would hang or time out)."""
    library = _mapped_library("libm.so")
    out = _run_probe(tmp_path, library, FINCH_MALLOC=library)
    assert out.returncode == 0, out.stderr
    chosen, mapped, preload = out.stdout.split()
    assert (chosen, mapped, preload.split(":")[0].split()[0]) == ("system", "True", library)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexec_errors_exit_2_before_any_work(tmp_path):
    out = _run_probe(tmp_path, "x", FINCH_MALLOC="/nowhere/libtcmalloc.so")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "finch-train: error: FINCH_MALLOC=/nowhere/libtcmalloc.so: no such file"


@pytest.mark.parametrize("name", list(malloc.LIBRARIES))
def test_auto_preloads_the_installed_allocator(tmp_path, name):
    """``auto`` on this machine: the first allocator installed is the one the process runs with. Needs the library
    (Debian: libgoogle-perftools4, libjemalloc2); CI's image has neither, so there it is skipped, with this reason."""
    installed = [n for n in malloc.LIBRARIES if malloc.find_library(n)]
    if name not in installed:
        pytest.skip(
            reason=f"{name} is not installed here ({', '.join(malloc.LIBRARIES[name])} in none of the usual dirs)"
        )
    env = {} if installed[0] == name else {"FINCH_MALLOC": name}
    out = _run_probe(tmp_path, malloc.find_library(name), **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == [name, "True"]
