"""Published peak matmul throughput of accelerators: the denominator MaxText and Levanter report MFU against.

The benchmark's own MFU divides by a matmul peak *measured in the run*; this second figure divides by the chip's
spec sheet, so our numbers compare with theirs. Dense (no 2:4 sparsity) figures, per chip, in FLOP/s. CPUs have no
such figure here (turbo clocks and core counts of a VM are not a spec), so on CPU this MFU is not reported.
"""

from __future__ import annotations

__all__ = ["SPEC_PEAKS", "spec_peak_flops"]

# (substring of jax's ``device.device_kind``, {compute dtype: dense FLOP/s per chip}), most specific first.
SPEC_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12}),  # H200 SXM: same tensor cores as H100 SXM
    ("H100 PCIe", {"bfloat16": 756e12}),
    ("H100", {"bfloat16": 989e12}),  # H100 SXM
    ("A100", {"bfloat16": 312e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),  # v6e (Trillium)
    ("TPU v5 lite", {"bfloat16": 197e12}),  # v5e
    ("TPU v5", {"bfloat16": 459e12}),  # v5p
    ("TPU v4", {"bfloat16": 275e12}),
)


def spec_peak_flops(device_kind: str, dtype_name: str) -> float | None:
    """The chip's published dense peak for ``dtype_name`` (FLOP/s per chip), or ``None`` when not listed.

    >>> spec_peak_flops("NVIDIA H200", "bfloat16") / 1e12
    989.0
    >>> spec_peak_flops("cpu", "float32") is None
    True
    """
    for key, peaks in SPEC_PEAKS:
        if key in device_kind:
            return peaks.get(dtype_name)
    return None
