"""Installs that fit the machine: the runtime extras leave torch, transformers and libtpu out; every module of the
training stack imports without them; what needs them says which install command brings them; constraints.txt pins
every package the extras name."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "libtpu", "peft", "accelerate")


def _extras():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement):
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def _closure(extra, extras):
    """The requirement names an extra brings, following ``finch-optax[a,b]`` and ``jax[tpu]`` (libtpu)."""
    names = set()
    for requirement in extras[extra]:
        name = _name(requirement)
        inner = re.search(r"\[([^\]]+)\]", requirement)
        if name == "finch-optax":
            for sub in inner.group(1).split(","):
                names |= _closure(sub.strip(), extras)
        else:
            names.add(name)
            if name == "jax" and inner and "tpu" in inner.group(1):
                names.add("libtpu")
    return names


def test_runtime_extras_leave_out_torch_transformers_and_libtpu_and_the_rest_bring_them():
    extras = _extras()
    for runtime in ("models", "train", "lab"):
        assert not _closure(runtime, extras) & set(HEAVY), runtime
    assert "libtpu" in _closure("compile", extras) and "torch" not in _closure("compile", extras)
    assert {"torch", "transformers"} <= _closure("bench", extras)
    assert set(HEAVY) <= _closure("test", extras)


def test_constraints_pin_every_package_the_extras_name_and_the_makefile_uses_them():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {_name(r) for r in project["dependencies"]} | _closure("test", _extras())
    assert sorted(named - set(pins)) == []
    assert {"jax", "jaxlib", "libtpu"} <= set(pins) and pins["jax"] == pins["jaxlib"]
    makefile = (ROOT / "Makefile").read_text()
    assert (
        "CONSTRAINTS := constraints.txt" in makefile and "PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)" in makefile
    )
    assert "install: $(call stamp,lab)" in makefile and "test: install-test" in makefile
    assert "compile: install-compile" in makefile
    readme = (ROOT / "README.md").read_text()
    for accel in ("tpu", "cuda12"):
        assert f"'jax[{accel}]=={pins['jax']}'" in readme, accel


_WITHOUT_HEAVY = """
import importlib, pkgutil, runpy, sys
class Absent:  # as if not installed: importing them raises ModuleNotFoundError
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
import models, train
names = [m.name for p in (models, train) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print("imported", len(names), "modules")
from train import cli
print("compile rc", cli.main(["compile", "--topology", "v5e-4", "--model", "preset:tiny"]))
from train.bench import spec, torch_runner
try:
    torch_runner.build_torch_runner("torch-eager", None, "float32", "eager")
except spec.BenchError as e:
    print("bench:", e)
try:
    runpy.run_path("scripts/check_export.py", run_name="__main__")
except SystemExit as e:
    print("check_export exit", e.code)
"""


def test_the_stack_imports_without_torch_and_libtpu_and_names_the_install_command_where_needed(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_HEAVY.format(heavy=HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"imported \d{2,} modules", out.stdout)
    assert "compile rc 2" in out.stdout
    assert "compiling for a TPU topology needs libtpu" in out.stderr and "make install-compile" in out.stderr
    assert "bench: the PyTorch side of the benchmark needs torch and transformers (torch is missing)" in out.stdout
    assert "check_export exit 2" in out.stdout and "make install-test" in out.stderr
