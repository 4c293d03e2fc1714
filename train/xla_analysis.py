"""What XLA says about a compiled program: its memory analysis and its cost analysis, read in one place.

``compile`` (per-chip memory against HBM, FLOPs for the roofline) and ``bench`` (the compiled step's footprint and
XLA's FLOP count) both read them here, so both report the same fields under the same names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["costs", "memory"]


def memory(compiled: Any) -> dict[str, int] | None:
    """Bytes per device of a compiled program: ``arguments``, ``outputs``, ``aliased`` (donated buffers),
    ``temporaries``, ``generated_code``, XLA's own heap-simulation peak ``xla_peak`` (0 where not reported), and
    ``total`` — the conservative sum, with donated state counted once (as MaxText's ``train_compile`` reports it).

    ``None`` where the backend has no memory analysis.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    fields = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
        "xla_peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    }
    fields["total"] = (
        fields["arguments"] + fields["outputs"] - fields["aliased"] + fields["temporaries"] + fields["generated_code"]
    )
    return fields


def costs(compiled: Any) -> dict[str, float] | None:
    """XLA's ``flops`` and HBM ``bytes_accessed`` per device (a loop body counted once); ``None`` where the backend
    has no cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return {"flops": float(analysis["flops"]), "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}
