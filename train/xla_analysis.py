"""What XLA says about a compiled program: its memory analysis and its cost analysis, read in one place.

``compile`` (per-chip memory against HBM, FLOPs for the roofline, the bytes every collective moves) and ``bench`` (the compiled step's footprint and
XLA's FLOP count) both read them here, so both report the same fields under the same names.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["COLLECTIVE_KINDS", "collectives", "costs", "memory"]


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


# ------------------------------------------------------------------------------------------------------------------
# Collectives: the bytes each device moves over the interconnect, read from the compiled program's HLO text.
# ------------------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_CALLED = re.compile(
    r"\b(calls|body|branch_computations|true_computation|false_computation|called_computations)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_GROUPS = re.compile(
    r"replica_groups=(\{\{[^}]*\}|\{\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?|mesh\[[^\]]*\] \{[^}]*\})"
)
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_OPS = {k: k for k in COLLECTIVE_KINDS} | {f"{k}-start": k for k in COLLECTIVE_KINDS}


def _bytes_of(shape: str) -> list[float]:
    """Bytes of each array in an HLO shape (``bf16[2,64]{1,0:T(8,128)}`` or a tuple of them)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            sizes.append(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype])
    return sizes


def _split_shape(rest: str) -> tuple[str, str]:
    """``"(f32[2], s32[]) tuple(...)"`` -> the shape and what follows it."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


_Computations = dict[str, list[tuple[str, str, str, str]]]


def _parse_module(text: str) -> tuple[_Computations, str | None]:
    """HLO module text -> ``{computation: [(name, shape, opcode, rest of the line)]}`` (the root last) and the
    entry's name."""
    computations: _Computations = {}
    roots: dict[str, tuple[str, str, str, str]] = {}
    entry = current = None
    for line in text.splitlines():
        if not line.startswith(" "):
            match = _HEADER.match(line)
            if match and line.rstrip().endswith("{"):
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        name, rest = match.groups()
        shape, rest = _split_shape(rest)
        opcode = rest.split("(", 1)[0].strip()
        if line.lstrip().startswith("ROOT "):
            roots[current] = (name, shape, opcode, rest)
        else:
            computations[current].append((name, shape, opcode, rest))
    for name, root in roots.items():
        computations[name].append(root)
    return computations, entry


def _group_size(rest: str, devices: int) -> int:
    """Participants of one replica group: ``{{0,1,2,3},...}``, ``[G,S]<=[N]`` (iota) or ``mesh['a'=4,'b'=2] {'a'}``."""
    match = _GROUPS.search(rest)
    if match is None or match.group(1) == "{}":
        return devices
    groups = match.group(1)
    if groups.startswith("{{"):
        return len(groups[2:].split(","))
    if groups.startswith("["):
        return int(groups[1 : groups.index("]")].split(",")[-1])
    axes = groups[: groups.index("]")]
    sizes = {a: int(v) for a, v in re.findall(r"'([^']+)'=(\d+)", axes)}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", groups[groups.index("]") :]))


def _operands(rest: str) -> list[str]:
    """The instruction names an instruction's text (after its shape) passes as operands."""
    depth, end = 0, len(rest)
    for i, c in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0 and c == ")":
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[: end + 1])


def _scalar(instructions: dict[str, tuple[str, str, str, str]], name: str) -> int | None:
    """The value of an integer scalar constant (through converts and copies), or ``None``."""
    for _ in range(4):
        found = instructions.get(name)
        if found is None:
            return None
        _, shape, opcode, rest = found
        if opcode == "constant":
            value = re.match(r"constant\((-?\d+)\)", rest)
            return int(value.group(1)) if value and re.match(r"[su](8|16|32|64)\[\]", shape) else None
        if opcode not in ("convert", "copy", "bitcast"):
            return None
        name = _operands(rest)[0]
    return None


def _tuple_index(instructions: dict[str, tuple[str, str, str, str]], name: str) -> int | None:
    """``k`` where ``name`` is (a convert or copy of) ``get-tuple-element(param), index=k``."""
    for _ in range(4):
        found = instructions.get(name)
        if found is None:
            return None
        _, _, opcode, rest = found
        if opcode == "get-tuple-element":
            index = re.search(r"index=(\d+)", rest)
            return int(index.group(1)) if index else None
        if opcode not in ("convert", "copy", "bitcast"):
            return None
        name = _operands(rest)[0]
    return None


def _trip_count(computations: _Computations, caller: str, while_rest: str, condition: str, body: str) -> int | None:
    """A while loop's trip count: ``for (i = start; i < N; i += step)`` read from its condition (``compare`` of a
    tuple element with a constant), its body (the element's update, ``add(i, step)``) and its initial tuple in the
    caller (``start``; 0 when not a constant). ``None`` when the loop is not of that form."""
    cond = {name: inst for inst in computations.get(condition, []) for name in [inst[0]]}
    compare = next((inst for inst in computations.get(condition, [])[::-1] if inst[2] == "compare"), None)
    if compare is None:
        return None
    direction = re.search(r"direction=(\w+)", compare[3])
    lhs, rhs = (_operands(compare[3]) + [None, None])[:2]
    index, limit = _tuple_index(cond, lhs), _scalar(cond, rhs)
    if index is None or limit is None:  # N > i
        index, limit = _tuple_index(cond, rhs), _scalar(cond, lhs)
        direction_name = {"GT": "LT", "GE": "LE"}.get(direction.group(1) if direction else "", "")
    else:
        direction_name = direction.group(1) if direction else ""
    if index is None or limit is None or direction_name not in ("LT", "LE", "NE"):
        return None
    body_insts = {inst[0]: inst for inst in computations.get(body, [])}
    step = 1
    root = computations.get(body, [])[-1:] or []
    if root and root[0][2] == "tuple":
        elements = _operands(root[0][3])
        update = body_insts.get(elements[index]) if index < len(elements) else None
        if update is not None and update[2] == "add":
            a, b = (_operands(update[3]) + [None, None])[:2]
            step = _scalar(body_insts, b) if _tuple_index(body_insts, a) == index else _scalar(body_insts, a)
            step = step or 1
    start = 0
    callers = {inst[0]: inst for inst in computations.get(caller, [])}
    init = callers.get((_operands(while_rest) or [""])[0])
    if init is not None and init[2] == "tuple":
        elements = _operands(init[3])
        start = (_scalar(callers, elements[index]) or 0) if index < len(elements) else 0
    span = limit - start + (1 if direction_name == "LE" else 0)
    return max(0, -(-span // step)) if step > 0 else None


def _traffic(kind: str, size: float, n: int) -> float:
    """Bytes one participant sends (= receives) in a ring implementation of ``kind`` over ``n`` participants;
    ``size`` is the per-device result (the input, for a reduce-scatter written as an all-reduce + slice)."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * size * (n - 1) / n  # reduce-scatter + all-gather
    if kind == "collective-permute":
        return size
    return size * (n - 1) / n  # all-gather (size = gathered result), reduce-scatter (size = input), all-to-all


def collectives(compiled_or_text: Any, *, num_slices: int = 1) -> dict[str, Any] | None:
    """Bytes one device sends over the interconnect per run of a compiled program, by collective, split into ICI
    (within a slice) and DCN (between slices), read from the HLO text of ``compiled.as_text()``.

    Counted per device, as a ring implementation moves them: an all-gather or all-to-all over ``n`` devices moves
    ``(n-1)/n`` of its result, a reduce-scatter ``(n-1)/n`` of its input, an all-reduce twice that (reduce-scatter
    then all-gather), a collective-permute its whole buffer. XLA's TPU programs write some reduce-scatters as an
    all-reduce + slice fused into one op (``AllReduceScatterFusion``); they are counted as reduce-scatters. A
    collective that XLA spreads over a chain of fusions (async collective fusion: the same ``channel_id`` in each)
    is counted once. Between slices, XLA's TPU compiler writes the collectives as host transfers to the
    data-center network runtime (``send`` with ``_xla_megascale_transfer_type``): an ``ALL_REDUCE`` of a ``B``-byte
    buffer over ``num_slices`` slices moves ``2·B·(s-1)/s`` per device; other kinds ``B·(s-1)``.

    Loops: the body of a ``while`` counts as often as its trip count read from its condition (``i < N``); a loop
    whose count cannot be read is counted once and listed under ``loops`` with ``trip_count: None``.

    Returns ``{"ici_bytes", "dcn_bytes", "by_kind": {kind: bytes}, "ops": {kind: count}, "loops": [...]}`` per
    device, or ``None`` where the program has no text.
    """
    try:
        text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    except Exception:  # noqa: BLE001 - a backend without HLO text
        return None
    if not text:
        return None
    computations, entry = _parse_module(text)
    header = text.split("\n", 1)[0]
    partitions = int(m.group(1)) if (m := re.search(r"num_partitions=(\d+)", header)) else 1
    replicas = int(m.group(1)) if (m := re.search(r"replica_count=(\d+)", header)) else 1
    devices = partitions * replicas
    by_kind: dict[str, float] = {}
    ops: dict[str, int] = {}
    loops: list[dict[str, Any]] = []
    totals = {"ici_bytes": 0.0, "dcn_bytes": 0.0}

    def add(kind: str, network: str, traffic: float, times: float) -> None:
        by_kind[kind] = by_kind.get(kind, 0.0) + traffic * times
        ops[kind] = ops.get(kind, 0) + 1
        totals[network] += traffic * times

    def visit(name: str, times: float, seen: set[str], scatter: bool, path: frozenset[str]) -> None:
        for inst, shape, opcode, rest in computations.get(name, []):
            kind = _COLLECTIVE_OPS.get(opcode)
            if kind is not None:
                channel = re.search(r"channel_id=(\d+)", rest)
                key = channel.group(1) if channel else f"{name}/{inst}"
                if key not in seen:  # a chain of fusions that carry one collective: once
                    seen.add(key)
                    sizes = _bytes_of(shape)
                    if opcode.endswith("-start") and shape.startswith("("):  # (operands, results[, context])
                        sizes = sizes[len(sizes) // 2 :] if kind != "collective-permute" else sizes[1:2]
                    if kind == "all-reduce" and scatter:
                        kind = "reduce-scatter"
                        traffic = _traffic(kind, sum(sizes), _group_size(rest, devices))
                    elif kind == "reduce-scatter":
                        n = _group_size(rest, devices)
                        traffic = _traffic(kind, sum(sizes) * n, n)
                    else:
                        traffic = _traffic(kind, sum(sizes), _group_size(rest, devices))
                    add(kind, "ici_bytes", traffic, times)
            elif opcode == "send" and "_xla_megascale_transfer_type" in rest:
                transfer = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', rest).group(1)
                buffer = _bytes_of(shape)[0]
                s = max(num_slices, 1)
                traffic = 2 * buffer * (s - 1) / s if transfer == "ALL_REDUCE" else buffer * (s - 1)
                add(f"dcn {transfer.lower().replace('_', '-')}", "dcn_bytes", traffic, times)
            for attr, ref in _CALLED.findall(rest):
                names = [n for n in re.findall(r"%?([\w.\-]+)", ref) if n in computations and n not in path]
                if attr == "body":
                    condition = re.search(r"condition=%?([\w.\-]+)", rest)
                    trips = (
                        _trip_count(computations, name, rest, condition.group(1), names[0])
                        if condition and names
                        else None
                    )
                    loops.append({"while": inst, "in": name, "trip_count": trips})
                    for n in names:
                        visit(n, times * (trips or 1), set(), False, path | {n})
                    continue
                fused = opcode == "fusion"  # a fusion runs inside its caller: same chain of collectives
                into_scatter = scatter or "AllReduceScatterFusion" in rest
                for n in names:
                    visit(n, times, seen if fused else set(), into_scatter, path | {n})

    if entry is not None:
        visit(entry, 1.0, set(), False, frozenset({entry}))
    return {**totals, "by_kind": by_kind, "ops": ops, "loops": loops, "devices_per_program": devices}
