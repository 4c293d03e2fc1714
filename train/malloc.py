"""Which ``malloc`` a ``finch-train`` process runs with, chosen before JAX is imported.

XLA:CPU allocates a train step's temporaries (5.95 GB for SmolLM2-135M at 4 x 512 tokens, fp32) in large blocks
and frees them at the end of the step. glibc serves blocks that large with a fresh ``mmap`` and unmaps them on
``free``, so every step faults its temporaries in again page by page: 1.45M minor faults and 5–22 s of kernel time
per step on the 2-core development VMs (``scripts/malloc_probe.py``; docs/bench.md, round 4: the step ran in 0.69×
the time under tcmalloc). tcmalloc and jemalloc keep freed memory
for the next step. ``python -m train`` / ``finch-train`` therefore re-executes itself once, at start, with the first
of them it finds preloaded (``LD_PRELOAD``), unless told otherwise:

* ``FINCH_MALLOC=auto`` (the default): tcmalloc, else jemalloc, else the system malloc, silently;
* ``FINCH_MALLOC=system``: never preload anything;
* ``FINCH_MALLOC=tcmalloc`` / ``jemalloc`` / a library's path: that one, or exit 2 if it is not there.

A process whose ``LD_PRELOAD`` already names an allocator is left as it is. Only Linux. The choice changes speed
and resident memory, never numbers: the allocator has no part in what XLA computes. ``make install`` puts Debian's
tcmalloc into the virtual environment (``python -m train.malloc fetch``: ``apt-get download``, no system install);
elsewhere ``apt-get install libgoogle-perftools4`` (tcmalloc) or ``libjemalloc2``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV",
    "LIBRARIES",
    "MallocError",
    "Plan",
    "describe",
    "find_library",
    "plan",
    "preload_env",
    "reexec_with_chosen_malloc",
    "release_free_memory",
]

ENV = "FINCH_MALLOC"
# Set in the re-executed process: it says what was chosen and stops a second re-exec whatever happens to LD_PRELOAD.
CHOSEN_ENV = "FINCH_MALLOC_CHOSEN"

# In the order ``auto`` tries them. tcmalloc_minimal is tcmalloc without the heap profiler (nothing else to link).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1"),
}
# ``make install`` extracts Debian's tcmalloc here (:func:`fetch`), so a machine without it installed still has it.
VENDORED_DIR = Path(sys.prefix) / "lib" / "finch-malloc"
LIBRARY_DIRS = (
    str(VENDORED_DIR),
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
)
_MARKERS = {"tcmalloc": "tcmalloc", "jemalloc": "jemalloc", "mimalloc": "mimalloc"}
# tcmalloc writes a line to stderr for every allocation over 1 GB by default; XLA:CPU's temporaries are one.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class MallocError(ValueError):
    """``FINCH_MALLOC`` names an allocator that is not there, or is not a name this module knows."""


@dataclass(frozen=True)
class Plan:
    """Re-execute with ``env`` (``LD_PRELOAD`` = ``library``): the allocator ``name`` was chosen."""

    name: str
    library: str
    env: dict[str, str]


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """The allocator this process runs with, as a name: ``tcmalloc``, ``jemalloc``, ``mimalloc`` or ``system``
    (what the C library provides), from ``LD_PRELOAD``."""
    for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split():
        for name, marker in _MARKERS.items():
            if marker in Path(entry).name:
                return name
    return "system"


def find_library(name: str, dirs: Sequence[str] = LIBRARY_DIRS) -> str | None:
    """The path of allocator ``name``'s shared library in ``dirs``, or None."""
    for directory in dirs:
        for filename in LIBRARIES[name]:
            path = Path(directory) / filename
            if path.is_file():
                return str(path)
    return None


def plan(
    environ: Mapping[str, str],
    *,
    platform: str = sys.platform,
    find: Callable[[str], str | None] = find_library,
) -> Plan | None:
    """What to re-execute with, or None to go on as this process is. Raises :class:`MallocError` for a
    ``FINCH_MALLOC`` that names a missing library or an unknown allocator."""
    wanted = environ.get(ENV, "auto").strip() or "auto"
    if wanted not in ("auto", "system", *LIBRARIES) and "/" not in wanted:
        raise MallocError(
            f"{ENV}={wanted!r}: expected auto, system, {', '.join(LIBRARIES)} or the path of a malloc library"
        )
    if wanted == "system" or CHOSEN_ENV in environ or describe(environ) != "system":
        return None
    if not platform.startswith("linux"):
        if wanted == "auto":
            return None
        raise MallocError(f"{ENV}={wanted}: preloading an allocator is supported on Linux only")
    if "/" in wanted:
        if not Path(wanted).is_file():
            raise MallocError(f"{ENV}={wanted}: no such file")
        name, library = describe({"LD_PRELOAD": wanted}), wanted
    else:
        names = list(LIBRARIES) if wanted == "auto" else [wanted]
        found = [(name, find(name)) for name in names]
        found = [(name, path) for name, path in found if path]
        if not found:
            if wanted == "auto":
                return None
            raise MallocError(
                f"{ENV}={wanted}: {' or '.join(LIBRARIES[wanted])} not found in {', '.join(LIBRARY_DIRS)} "
                f"(Debian/Ubuntu: apt-get install {'libgoogle-perftools4' if wanted == 'tcmalloc' else 'libjemalloc2'}"
                f"), or set {ENV}=system"
            )
        name, library = found[0]
    return Plan(name, library, preload_env(environ, name, library))


def preload_env(environ: Mapping[str, str], name: str, library: str | None) -> dict[str, str]:
    """``environ`` for a child process that runs with allocator ``name`` (its shared ``library``; None for
    ``system``): any allocator already in ``LD_PRELOAD`` is taken out, ``library`` put first."""
    env = dict(environ)
    others = [
        p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if describe({"LD_PRELOAD": p}) == "system"
    ]
    preload = " ".join([library, *others] if library else others)
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    env[CHOSEN_ENV] = name
    for key, value in _QUIET.items():
        env.setdefault(key, value)
    return env


def reexec_with_chosen_malloc(argv: Sequence[str] | None = None) -> None:
    """Replace this process with itself under the chosen allocator (:func:`plan`); return if there is nothing to
    change. Call it first thing in an entry point, before anything allocates much: the process's state is lost.
    Exits with 2 (one line on stderr) for a ``FINCH_MALLOC`` that cannot be honoured."""
    try:
        chosen = plan(os.environ)
    except MallocError as e:
        print(f"finch-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if chosen is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, chosen.env)
    except OSError:
        return  # could not re-execute (a sandbox, say): go on with the system malloc


def release_free_memory() -> None:
    """Hands the free memory this process's allocator holds back to the OS (between benchmark phases, so a later
    phase's peak is not stacked on an earlier one's): tcmalloc's ``MallocExtension_ReleaseFreeMemory``, jemalloc's
    purge of every arena, glibc's ``malloc_trim``. Does nothing where none of them is found."""
    import ctypes

    try:
        process = ctypes.CDLL(None)  # every symbol the process has loaded, preloaded allocators first
    except OSError:
        return
    allocator = describe()
    if allocator == "tcmalloc" and hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        process.MallocExtension_ReleaseFreeMemory()
    elif allocator == "jemalloc" and hasattr(process, "mallctl"):
        process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))  # 4096: MALLCTL_ARENAS_ALL
    elif hasattr(process, "malloc_trim"):
        process.malloc_trim(ctypes.c_size_t(0))


def fetch(dest: Path = VENDORED_DIR) -> str:
    """Extracts Debian's ``libtcmalloc-minimal4`` and puts its library into ``dest``; returns its path. Raises
    RuntimeError where that cannot be done (no apt-get, no package lists, not Debian)."""
    import shutil  # here, not at the top: every finch-train start imports this module before anything else
    import tempfile

    from train.packages import fetch_deb

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        fetch_deb("libtcmalloc-minimal4", Path(tmp) / "root")
        found = sorted((Path(tmp) / "root").rglob(LIBRARIES["tcmalloc"][0]))
        if not found:
            raise RuntimeError(f"libtcmalloc-minimal4 holds no {LIBRARIES['tcmalloc'][0]}")
        target = dest / LIBRARIES["tcmalloc"][0]
        shutil.copyfile(found[0].resolve(), target.with_suffix(".part"))
        target.with_suffix(".part").replace(target)
    return str(target)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.malloc [fetch]``: say which allocator ``finch-train`` would run with here; ``fetch`` first
    puts Debian's tcmalloc into the virtual environment (best effort: where it cannot, says why and exits 0, since
    the system malloc works, only slower on CPU)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["fetch"]):
        print("usage: python -m train.malloc [fetch]", file=sys.stderr)
        return 2
    if args == ["fetch"] and find_library("tcmalloc") is None:
        try:
            print(f"tcmalloc: {fetch()}")
        except RuntimeError as e:
            print(f"tcmalloc not fetched, finch-train will use the system malloc (slower on CPU): {e}".splitlines()[0])
    try:
        chosen = plan(os.environ)
    except MallocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 0 if args == ["fetch"] else 2  # an install is not the place to fail over a setting of the caller's
    print(
        f"finch-train runs with: {chosen.name} ({chosen.library})" if chosen else f"finch-train runs with: {describe()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
