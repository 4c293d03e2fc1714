"""Files from Debian packages without installing them: ``apt-get download`` + ``dpkg-deb -x`` into a folder of ours.

Used for the lab's built-in datasets (train/lab/sources.py) and for tcmalloc (train/malloc.py); no root needed
beyond what ``apt-get download`` needs (package lists: ``make`` runs ``apt-get update`` once where they are missing).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["fetch_deb", "run_tool"]


def run_tool(cmd: Sequence[str], cwd: Path) -> None:
    """Runs ``cmd``; a missing tool or a failure is a RuntimeError with the command and its stderr."""
    try:
        subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` is not installed; it is needed to fetch {' '.join(cmd[1:])}") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{e.stderr.strip()}") from e


def fetch_deb(package: str, dest: Path) -> None:
    """Extracts Debian ``package`` (the candidate version of this machine's package lists) under ``dest``."""
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            run_tool(["apt-get", "download", package], cwd=Path(tmp))
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}\n(on a fresh Debian/Ubuntu machine run `apt-get update` first; or extract the "
                f"package yourself and pass --package-root)"
            ) from None
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} produced {[d.name for d in debs]}, expected one .deb")
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(["dpkg-deb", "-x", str(debs[0]), str(dest)], cwd=Path(tmp))
