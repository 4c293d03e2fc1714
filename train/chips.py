"""Accelerators' published per-chip limits, in one table: TPU generations (for pod compiles) and GPUs.

``compile`` reads a TPU generation's HBM, bf16 peak, HBM bandwidth and interconnect bandwidths (ICI within a slice,
DCN between slices) for its memory check and roofline; ``bench``
reads the peak of whatever chip it runs on for the MFU that MaxText and Levanter report (dense figures, no 2:4
sparsity). CPUs have no entry (a VM's turbo clocks and core counts are not a spec): the benchmark's other MFU
divides by a matmul peak measured in the same run.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ACCELERATORS",
    "GPU_TARGETS",
    "Chip",
    "GiB",
    "TPU_CHIPS",
    "chip_for_device_kind",
    "gpu_target_config",
    "spec_peak_flops",
]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published per-chip limits.

    Attributes:
      name: the short name (``v5e``, ``h100-sxm``); for TPUs the accelerator-type prefix.
      device_kind: what ``jax.Device.device_kind`` reports for it (matched as a substring).
      hbm_bytes: HBM capacity per chip.
      peak_bf16_flops: peak dense bf16 matmul FLOP/s per chip.
      hbm_bytes_per_second: HBM bandwidth per chip.
      source: where the numbers come from.
      dims: TPUs: 2 for 2D-torus generations (v5e, v6e), 3 for 3D (v4, v5p); 0 for GPUs.
      cores_per_chip_in_name: TPUs: 2 where the accelerator type counts TensorCores (v4, v5p), else 1.
      chip_config: TPUs: libtpu's chip configuration for JAX's one-device-per-chip view (v4 runs as "megacore").
      slice_sizes: TPUs: chip counts a single slice can have.
      ici_bytes_per_second: what one chip can send (and at the same time receive) over all its chip-to-chip links
        (TPU ICI, GPU NVLink): half the published bidirectional per-chip figure. 0: unknown.
      dcn_bytes_per_second: what one chip can send to other slices (TPU data-center network; GPU: the node's
        network per GPU): the published per-host NIC bandwidth over the chips of a host. 0: unknown.
      network_source: where the two bandwidths come from, and which are derived or assumed.
    """

    name: str
    device_kind: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_second: float
    source: str
    dims: int = 0
    cores_per_chip_in_name: int = 1
    chip_config: str = ""
    slice_sizes: tuple[int, ...] = ()
    ici_bytes_per_second: float = 0.0
    dcn_bytes_per_second: float = 0.0
    network_source: str = ""


_POW2_3D = tuple(2**k for k in range(2, 13))  # 4 .. 4096 chips: 2x2x1 .. 16x16x16
_POW2_2D = (1, 4, 8, 16, 32, 64, 128, 256)

_Gbps = 1e9 / 8  # bytes per second of one Gbit/s

# Published Cloud TPU specifications (the "System architecture" table of each generation's page). Interconnect:
# the pages give the bidirectional ICI bandwidth per chip (v5e 400, v5p 1200, v6e 800 GB/s; "Interchip
# Interconnect BW" 1600 / 4800 / 3584 Gbit/s in older versions of the same pages, i.e. one direction) and, for
# v5p, the DCN bandwidth per chip (50 Gbit/s); v5e and v6e give the NICs per 8-chip host (2 x 100, 4 x 200
# Gbit/s; = 6.4 and 25.6 Tbit/s per 256-chip Pod, the pages' other figure). v4's page gives neither: its ICI figure
# is derived from its "all-reduce bandwidth per Pod" (1.1 PB/s over 4096 chips), the same derivation that gives
# exactly half the bidirectional figure for v5e (51.2 TB/s / 256) and v6e (102.4 TB/s / 256); its DCN bandwidth is
# not published (unknown): the lowest per-chip figure of the other generations, v5e's 25 Gbit/s, is assumed.
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip(
        "v4", "TPU v4", 32 * GiB, 275e12, 1200e9,
        "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s",
        dims=3, cores_per_chip_in_name=2, chip_config="megacore", slice_sizes=_POW2_3D,
        ici_bytes_per_second=1.1e15 / 4096, dcn_bytes_per_second=25 * _Gbps,
        network_source="cloud.google.com/tpu/docs/v4: no per-chip ICI figure; 268.6 GB/s one way = its all-reduce "
        "bandwidth per Pod, 1.1 PB/s, over 4096 chips (derived); DCN per chip not published: unknown, v5e's 25 "
        "Gbit/s assumed",
    ),
    "v5e": Chip(
        "v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9,
        "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, HBM2 16 GB at 819 GB/s",
        dims=2, chip_config="default", slice_sizes=_POW2_2D,
        ici_bytes_per_second=400e9 / 2, dcn_bytes_per_second=2 * 100 * _Gbps / 8,
        network_source="cloud.google.com/tpu/docs/v5e: bidirectional ICI 400 GB/s per chip (1600 Gbit/s one way); "
        "2 x 100 Gbit/s NICs per 8-chip host = 25 Gbit/s per chip (6.4 Tbit/s per 256-chip Pod)",
    ),
    "v5p": Chip(
        "v5p", "TPU v5", 95 * GiB, 459e12, 2765e9,
        "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, HBM2e 95 GiB at 2765 GB/s",
        dims=3, cores_per_chip_in_name=2, chip_config="default", slice_sizes=_POW2_3D,
        ici_bytes_per_second=1200e9 / 2, dcn_bytes_per_second=50 * _Gbps,
        network_source="cloud.google.com/tpu/docs/v5p: bidirectional ICI 1200 GB/s per chip (4800 Gbit/s one way); "
        "DCN 50 Gbit/s per chip",
    ),
    "v6e": Chip(
        "v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9,
        "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, HBM 32 GB at 1640 GB/s",
        dims=2, chip_config="default", slice_sizes=_POW2_2D,
        ici_bytes_per_second=800e9 / 2, dcn_bytes_per_second=4 * 200 * _Gbps / 8,
        network_source="cloud.google.com/tpu/docs/v6e: bidirectional ICI 800 GB/s per chip; 4 x 200 Gbit/s NICs per "
        "8-chip host = 100 Gbit/s per chip (25.6 Tbit/s per 256-chip Pod)",
    ),
}  # fmt: skip

# NVIDIA's data sheets (dense tensor-core bf16, SXM unless named). Interconnect: NVLink per GPU (H100/H200 SXM: 18
# links, 900 GB/s bidirectional; A100: 600 GB/s); between nodes, one 400 Gbit/s NIC per GPU as in NVIDIA's DGX
# H100/H200 (200 Gbit/s for DGX A100): deployment-dependent, these are the reference systems' figures.
_GPU_CHIPS = (
    Chip("h200", "H200", 141 * 10**9, 989e12, 4.8e12, "nvidia.com H200 data sheet: 989 TFLOP/s bf16, 141 GB at 4.8 TB/s",
         ici_bytes_per_second=450e9, dcn_bytes_per_second=400 * _Gbps,
         network_source="nvidia.com H200 data sheet: NVLink 900 GB/s bidirectional; DGX H200: 400 Gbit/s NIC per GPU"),
    Chip("h100-pcie", "H100 PCIe", 80 * 10**9, 756e12, 2.0e12, "nvidia.com H100 data sheet: PCIe 756 TFLOP/s, 2.0 TB/s"),
    Chip("h100-sxm", "H100", 80 * 10**9, 989e12, 3.35e12, "nvidia.com H100 data sheet: SXM 989 TFLOP/s, 3.35 TB/s",
         ici_bytes_per_second=450e9, dcn_bytes_per_second=400 * _Gbps,
         network_source="nvidia.com H100 data sheet: NVLink 900 GB/s bidirectional; DGX H100: 400 Gbit/s NIC per GPU"),
    Chip("a100", "A100", 80 * 10**9, 312e12, 2.039e12, "nvidia.com A100 data sheet: 312 TFLOP/s bf16, 80 GB at 2.0 TB/s",
         ici_bytes_per_second=300e9, dcn_bytes_per_second=200 * _Gbps,
         network_source="nvidia.com A100 data sheet: NVLink 600 GB/s bidirectional; DGX A100: 200 Gbit/s NIC per GPU"),
)  # fmt: skip

# What XLA's GPU compiler needs to know of a GPU it does not see (its GpuTargetConfigProto): the hardware facts
# of NVIDIA's data sheets and the CUDA programming guide's compute-capability table. (name, compute capability,
# SMs, boost clock GHz, L2 bytes, shared memory per SM / opt-in per block in bytes).
GPU_TARGETS: dict[str, tuple[tuple[int, int], int, float, int, int, int]] = {
    "h100-sxm": ((9, 0), 132, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024),
    "h200": ((9, 0), 132, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024),
    "a100": ((8, 0), 108, 1.41, 40 * 2**20, 164 * 1024, 163 * 1024),
}


def gpu_target_config(chip: Chip) -> str:
    """The text ``GpuTargetConfigProto`` that lets XLA compile for ``chip`` without one attached (deviceless AOT)."""
    (major, minor), sms, clock, l2, smem, smem_optin = GPU_TARGETS[chip.name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem}
  shared_memory_per_block_optin: {smem_optin}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  memory_bandwidth: {int(chip.hbm_bytes_per_second)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {chip.hbm_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  name: "NVIDIA {chip.device_kind}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "NVIDIA {chip.device_kind}"
"""


# Every chip, in the order device kinds are matched: most specific first ("TPU v5 lite" before "TPU v5").
ACCELERATORS: tuple[Chip, ...] = (
    *_GPU_CHIPS,
    TPU_CHIPS["v6e"],
    TPU_CHIPS["v5e"],
    TPU_CHIPS["v5p"],
    TPU_CHIPS["v4"],
)


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The table's chip whose ``device_kind`` occurs in ``device_kind`` (as jax reports it), or ``None``.

    >>> chip_for_device_kind("TPU v5 lite").name
    'v5e'
    >>> chip_for_device_kind("NVIDIA H100 80GB HBM3").name
    'h100-sxm'
    """
    return next((chip for chip in ACCELERATORS if chip.device_kind in device_kind), None)


def spec_peak_flops(device_kind: str, dtype_name: str) -> float | None:
    """The chip's published dense peak for ``dtype_name`` (FLOP/s per chip), or ``None`` when not listed.

    >>> spec_peak_flops("NVIDIA H200", "bfloat16") / 1e12
    989.0
    >>> spec_peak_flops("cpu", "float32") is None
    True
    """
    chip = chip_for_device_kind(device_kind)
    return chip.peak_bf16_flops if chip is not None and dtype_name == "bfloat16" else None
