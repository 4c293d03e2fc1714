"""TPU pod topologies by name, with each chip's published limits, for ahead-of-time compiles on a CPU host.

``v5e-256``, ``v5p-64``, ``v4-32``, ``v6e-16`` are Cloud TPU accelerator types: the number counts chips on v5e/v6e and
TensorCores (two per chip) on v4/v5p, so ``v5p-64`` is 32 chips in a ``2x4x4`` slice. libtpu's own topology names
(``v5e:2x2``, ``v5p:2x4x4``) are accepted too. :func:`topology_devices` asks libtpu for the devices of such a slice
(times ``num_slices``) without any TPU attached; XLA then compiles for them exactly as it would on the pod.

Loading libtpu on a host without TPUs needs care: by default it takes a machine-wide lock file (so a second process,
e.g. a test run beside a compile, would fail) and prints warnings about missing TPU metadata.
:func:`quiet_libtpu_without_tpus` sets the environment that avoids both, and only on hosts that have no TPU chips.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
from typing import Any

from models.config import ConfigError
from train.chips import ACCELERATORS, GPU_TARGETS, TPU_CHIPS, Chip, gpu_target_config

__all__ = [
    "CHIPS",
    "Chip",
    "Topology",
    "TopologyError",
    "parse_gpu",
    "parse_topology",
    "quiet_libtpu_without_tpus",
    "require_libtpu",
    "topology_devices",
]


class TopologyError(ConfigError):
    """A topology name, size or slice count that does not describe a TPU pod slice (a user error: exit 2)."""


# The TPU generations a topology can name (their limits: :mod:`train.chips`).
CHIPS = TPU_CHIPS


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU slice, possibly repeated over several slices joined by the data-center network.

    Attributes:
      name: the name as given (``v5p-64`` or ``v5p:2x4x4``).
      chip: the chip generation.
      shape: chips along each torus dimension of one slice (``(2, 4, 4)``).
      num_slices: slices (1 = a single ICI-connected slice).
    """

    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1
    platform: str = "tpu"  # or "gpu": NVIDIA GPUs of one node (shape = (gpus,)), from the CUDA plugin

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        """libtpu's name of one slice, e.g. ``v5p:2x4x4`` (a GPU node: ``h100-sxm:8``)."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        slices = f" × {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name} ({self.libtpu_name}{slices}: {self.num_chips} chips, {self.chip.device_kind})"


def _shape_for(chip: Chip, chips: int) -> tuple[int, ...]:
    """The standard slice shape of ``chips`` chips: start from one host and double the smallest, last-listed side.

    That rule reproduces Google's tables: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... and 2x2, 2x4, 4x4, 4x8, ...
    """
    if chip.dims == 2:
        shape = [1, 1] if chips == 1 else [2, 2]
    else:
        shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = len(shape) - 1 - shape[::-1].index(smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """A :class:`Topology` from an accelerator type (``v5e-256``) or a libtpu name (``v5e:16x16``).

    Raises:
      TopologyError: an unknown generation, a size that no slice has, or ``num_slices < 1``.

    >>> parse_topology("v5p-64").describe()
    'v5p-64 (v5p:2x4x4: 32 chips, TPU v5)'
    >>> parse_topology("v5e-16", num_slices=2).num_chips
    32
    """
    if not isinstance(num_slices, int) or num_slices < 1:
        raise TopologyError(f"--num-slices must be a positive integer, got {num_slices!r}")
    text = name.strip().lower()
    known = ", ".join(sorted(CHIPS))
    match = re.fullmatch(r"(v\d+[a-z]?)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    if match is None:
        raise TopologyError(
            f"topology {name!r} is not a TPU accelerator type like v5e-256, v5p-64, v4-32, v6e-16 "
            f"(or a libtpu name like v5e:4x4, v5p:2x4x4); generations: {known}"
        )
    generation, count, dims = match.groups()
    if generation not in CHIPS:
        raise TopologyError(f"topology {name!r}: unknown TPU generation {generation!r}; known: {known}")
    chip = CHIPS[generation]
    if dims is not None:
        shape = tuple(int(d) for d in dims.split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TopologyError(
                f"topology {name!r}: {generation} slices have {chip.dims} dimensions, like {generation}:{'x'.join(['2'] * chip.dims)}"
            )
        chips = math.prod(shape)
    else:
        cores = int(count)
        if cores % chip.cores_per_chip_in_name:
            raise TopologyError(
                f"topology {name!r}: {generation} accelerator types count TensorCores, "
                f"{chip.cores_per_chip_in_name} per chip, so the number must be even"
            )
        chips = cores // chip.cores_per_chip_in_name
        if chips not in chip.slice_sizes:
            names = ", ".join(f"{generation}-{n * chip.cores_per_chip_in_name}" for n in chip.slice_sizes)
            raise TopologyError(f"topology {name!r}: no {generation} slice has {chips} chips; sizes: {names}")
        shape = _shape_for(chip, chips)
    return Topology(name=name, chip=chip, shape=shape, num_slices=num_slices)


GPU_NAMES = {"h100": "h100-sxm", "h100-sxm": "h100-sxm", "h200": "h200", "a100": "a100"}


def parse_gpu(name: str) -> Topology:
    """A node of NVIDIA GPUs: ``h100`` (8 of them, one node), ``h200:4``, ``a100:8``.

    Raises:
      TopologyError: an unknown GPU or a count outside 1..8 (one node: GPUs of several nodes would talk over the
        network, which the compile's count of collectives does not tell apart from NVLink).

    >>> parse_gpu("h200:4").describe()
    'h200:4 (h200:4: 4 chips, H200)'
    """
    text = name.strip().lower()
    model, _, count = text.partition(":")
    known = ", ".join(sorted({k for k in GPU_NAMES if k in GPU_TARGETS or GPU_NAMES[k] in GPU_TARGETS}))
    if GPU_NAMES.get(model) not in GPU_TARGETS:
        raise TopologyError(f"--gpu {name!r}: unknown GPU; known: {known} (optionally :COUNT, 1 to 8)")
    if count and (not count.isdigit() or not 1 <= int(count) <= 8):
        raise TopologyError(f"--gpu {name!r}: the GPU count must be 1 to 8 (one node)")
    chip = next(c for c in ACCELERATORS if c.name == GPU_NAMES[model])
    return Topology(name=text if count else f"{model}:8", chip=chip, shape=(int(count or 8),), platform="gpu")


def _host_has_tpu() -> bool:
    """Whether this machine has TPU chips (Google's PCI vendor id), the check jax itself makes before using them."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_tpus() -> None:
    """On a host without TPU chips, lets libtpu load for compiling without its lock file and metadata warnings.

    Call before jax initialises a backend. On a TPU host it changes nothing.
    """
    if _host_has_tpu():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no /tmp/libtpu_lockfile: nothing to protect here
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


@functools.cache
def require_libtpu() -> None:
    """Refuses, naming the install command, when libtpu (the TPU compiler, left out of ``make install``) is missing.

    Raises:
      TopologyError: libtpu cannot be imported.
    """
    quiet_libtpu_without_tpus()
    try:
        import libtpu  # noqa: F401  (only to give a clear error when it is missing)
    except ImportError:
        import jax

        raise TopologyError(
            "compiling for a TPU topology needs libtpu, the TPU compiler (~700 MB), which `make install` leaves out: "
            "run `make install-compile` in the finch-optax checkout, or there `pip install -c constraints.txt -e "
            f"'.[compile]'` (on a TPU VM it comes with `pip install -c constraints.txt 'jax[tpu]=={jax.__version__}'`)"
        ) from None


def topology_devices(topology: Topology) -> list[Any]:
    """The (abstract) devices of ``topology``, from libtpu (or for GPUs, JAX's CUDA plugin); compile for them with
    ``jit(...).lower(...).compile()``.

    Raises:
      TopologyError: libtpu (the CUDA plugin) is not installed, or refuses the topology.
    """
    if topology.platform == "gpu":
        return _gpu_devices(topology)
    require_libtpu()
    from jax.experimental import topologies

    host_bounds = (1, 1, 1) if topology.chips_per_slice < 4 else (2, 2, 1)
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.libtpu_name,
            chip_config_name=topology.chip.chip_config,
            chips_per_host_bounds=host_bounds,
            num_slices=topology.num_slices,
        )
    except Exception as e:  # libtpu raises XlaRuntimeError with its own message
        raise TopologyError(f"libtpu refused topology {topology.describe()}: {e}") from e
    devices = list(description.devices)
    if len(devices) != topology.num_chips:
        raise TopologyError(
            f"libtpu gave {len(devices)} devices for {topology.describe()}; expected one per chip ({topology.num_chips})"
        )
    return devices


def _gpu_devices(topology: Topology) -> list[Any]:
    """Compile-only devices of one node of ``topology.chip`` GPUs, from JAX's CUDA plugin given the GPU's target
    description (:func:`train.chips.gpu_target_config`): XLA's GPU compiler then needs no GPU attached."""
    from jax.experimental import topologies

    try:
        import jax_plugins.xla_cuda12  # noqa: F401  (only to give a clear error when it is missing)
    except ImportError:
        raise TopologyError(
            "compiling for a GPU needs JAX's CUDA plugin (no GPU needed): pip install jax-cuda12-plugin "
            "jax-cuda12-pjrt (the versions of the installed jax)"
        ) from None
    try:
        description = topologies.get_topology_desc(
            platform="cuda",
            topology_name="",
            target_config=gpu_target_config(topology.chip),
            topology=f"1x1x{topology.num_chips}",  # slices x hosts x GPUs per host
        )
    except Exception as e:  # the plugin raises JaxRuntimeError with its own message
        raise TopologyError(f"JAX's CUDA plugin refused {topology.describe()}: {e}") from e
    return list(description.devices)
