"""Where the JAX step's time goes: XLA's per-op timings from a profiler trace, split by op class.

XLA:CPU emits one trace event per executed thunk (a fusion, a dot, a copy ...) named after its HLO instruction. The
compiled module's text names, for every instruction, the JAX operation it came from (``op_name``) and the Python
line that built it (a stack-frame table), so each event maps to a class of :data:`OP_CLASSES` by where in the model
or optimizer its code lives. Thunks of one step may run concurrently on the two cores, so time is attributed by a
sweep over the timeline: every interval is divided equally among the thunks running in it, and the sum over classes
is the step's wall time (minus the gaps where no thunk ran, reported as ``runtime``).
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "OP_CLASSES",
    "HloInstruction",
    "attribute_wall_time",
    "class_split",
    "classify_instruction",
    "pair_end_marks",
    "parse_hlo",
    "profile_jax_step",
    "trace_events",
]

# The classes both frameworks' profiles are split into (the issue's list), in table order.
OP_CLASSES = (
    "projections (q/k/v/o matmuls)",
    "MLP matmuls",
    "attention core (scores, mask, softmax, PV)",
    "LM head matmuls",
    "cross-entropy over the vocab",
    "embedding gather / scatter",
    "elementwise (norms, RoPE, SiLU, residual)",
    "copies / transposes",
    "optimizer update",
    "other",
    "runtime (no op running)",
)
(PROJ, MLP, ATTN, LMHEAD, CE, EMBED, ELEMWISE, COPY, OPT, OTHER, RUNTIME) = OP_CLASSES

# Trace events of the XLA runtime itself, not of an HLO instruction.
_RUNTIME_EVENT = re.compile(r"^(ThunkExecutor|ThreadpoolListener|SlinkyThreadPool|end: )")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) (\w[\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_PURE_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "constant"}


Frame = tuple[str, str, int]  # (file, function, line)


class HloInstruction:
    """One instruction of the compiled module: its opcode, JAX ``op_name``, the Python call stack that emitted it
    (innermost frame first), and for a fusion the opcodes inside it."""

    __slots__ = ("name", "opcode", "op_name", "frames", "fused_opcodes", "root_opcode")

    def __init__(self, name: str, opcode: str, op_name: str, frames: tuple[Frame, ...]):
        self.name, self.opcode, self.op_name, self.frames = name, opcode, op_name, frames
        self.fused_opcodes: set[str] = set()
        self.root_opcode: str | None = None

    @property
    def frame(self) -> Frame | None:
        """The innermost Python frame, or ``None`` when XLA kept no source for the instruction."""
        return self.frames[0] if self.frames else None


def _table(text: str, title: str) -> list[str]:
    match = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    return match.group(1).splitlines() if match else []


def _fields(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def _frames(text: str) -> dict[int, tuple[Frame, ...]]:
    """stack_frame_id -> the Python call stack, innermost frame first.

    The module text numbers frames from 1 and prints each parent as its number + 1 (so 1 means no parent).
    """
    files = {int(ln.split()[0]): ln.split(None, 1)[1].strip('"') for ln in _table(text, "FileNames")}
    funcs = {int(ln.split()[0]): ln.split(None, 1)[1].strip('"') for ln in _table(text, "FunctionNames")}
    locs = {}
    for ln in _table(text, "FileLocations"):
        f = _fields(ln)
        locs[int(ln.split()[0])] = (files.get(f["file_name_id"], "?"), funcs.get(f["function_name_id"], "?"), f["line"])
    table = {}
    for ln in _table(text, "StackFrames"):
        f = _fields(ln)
        table[int(ln.split()[0])] = (f.get("file_location_id"), f.get("parent_frame_id", 1) - 1)
    out = {}
    for frame_id in table:
        chain, seen, i = [], set(), frame_id
        while i in table and i not in seen:
            seen.add(i)
            loc, i = table[i]
            if loc in locs:
                chain.append(locs[loc])
        out[frame_id] = tuple(chain)
    return out


def parse_hlo(text: str) -> dict[str, HloInstruction]:
    """Every instruction of an optimized HLO module's text (``compiled.as_text()``), by name."""
    frames = _frames(text)
    instrs: dict[str, HloInstruction] = {}
    computations: dict[str, list[tuple[str, str, bool]]] = defaultdict(list)  # name -> [(instr, opcode, is_root)]
    fusion_calls: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else line.split()[1].lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode, rest = m.group(1), m.group(3), m.group(4)
        op_name = _OP_NAME.search(rest)
        frame_id = _FRAME_ID.search(rest)
        stack = frames.get(int(frame_id.group(1)), ()) if frame_id else ()
        instrs[name] = HloInstruction(name, opcode, op_name.group(1) if op_name else "", stack)
        if current is not None:
            computations[current].append((name, opcode, line.lstrip().startswith("ROOT")))
        if opcode == "fusion":
            calls = _CALLS.search(rest)
            if calls:
                fusion_calls[name] = calls.group(1)
    for name, comp in fusion_calls.items():
        body = computations.get(comp, [])
        instrs[name].fused_opcodes = {op for _, op, _ in body}
        roots = [(n, op) for n, op, root in body if root]
        if roots:
            instrs[name].root_opcode = roots[0][1]
            root_instr = instrs.get(roots[0][0])
            # A fusion's own metadata is often blank: take the root's when so.
            if root_instr is not None and not instrs[name].op_name:
                instrs[name].op_name, instrs[name].frames = root_instr.op_name, root_instr.frames
    return instrs


def _is_dot(instr: HloInstruction) -> bool:
    return instr.opcode in ("dot", "convolution") or "dot" in instr.fused_opcodes


def _frame_class(frame: Frame, instr: HloInstruction, dot: bool, ops: set[str]) -> str | None:
    """The class one Python frame gives the instruction, or ``None`` when the frame is a helper that says nothing
    (then the caller's frame decides)."""
    path, func = frame[0].replace(os.sep, "/"), frame[1]
    if path.endswith(("models/attention.py", "models/blockwise_attention.py")):
        return ATTN
    if func == "CausalLM.logits":
        return LMHEAD
    if path.endswith("models/loss.py") or "/optax/losses/" in path or func == "token_loss_sums":
        return LMHEAD if dot else CE
    if "/optax/" in path or "/finch_optax/" in path or path.endswith(("train/step.py", "train/optimizers.py")):
        return OPT
    if func == "Attention._project":
        return PROJ if dot else ELEMWISE  # the matmul; a bias add
    if func == "Attention.__call__":  # the output projection (and, before models/attention.py, the whole core)
        return PROJ if dot and "->bthd" not in instr.op_name and "bkgts" not in instr.op_name else ATTN
    if func == "MLP.__call__":
        return MLP if dot else ELEMWISE
    if func.startswith("CausalLM."):
        if dot:
            return LMHEAD
        if "gather" in ops or "scatter" in ops or "_take" in instr.op_name:
            return EMBED
        return ATTN if {"iota", "compare"} & ops else ELEMWISE  # the causal/segment mask
    if path.endswith("models/elementwise.py") or func.split(".")[0] in ("RMSNorm", "Block", "_rope_tables"):
        return ELEMWISE
    return None


def classify_instruction(instr: HloInstruction) -> str:
    """The :data:`OP_CLASSES` entry of one HLO instruction, from the Python call stack that emitted it.

    The innermost frame that belongs to a known part decides: this repository's model (``models/``), its loss, the
    train step and optimizer (``train/step.py``, optax, finch_optax). Pure layout fusions (copy, transpose,
    bitcast ...) are copies wherever they come from; anything unplaced is ``other``.
    """
    ops = instr.fused_opcodes or {instr.opcode}
    if instr.opcode in ("copy", "transpose") or (instr.fused_opcodes and ops <= _PURE_LAYOUT_OPS):
        return COPY
    dot = _is_dot(instr)
    for frame in instr.frames:
        cls = _frame_class(frame, instr, dot, ops)
        if cls is not None:
            return cls
    if "scatter" in ops or "gather" in ops:
        return EMBED
    return OTHER


def trace_events(xspace_path: str) -> list[tuple[int, int, str]]:
    """``(start_ns, end_ns, name)`` of every XLA op on the host threads of a ``*.xplane.pb``.

    An op's trace event covers its launch; an asynchronous op (an Eigen dot or a large copy, run on the thread
    pool) finishes later, which the runtime marks with an ``end: NAME`` instant. An op lasts from its event's start
    to the first unclaimed ``end:`` mark of its name after that (or its event's own end when later or unmarked).
    """
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xspace_path)
    starts: dict[str, list[tuple[int, int]]] = defaultdict(list)
    ends: dict[str, list[int]] = defaultdict(list)
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                if e.name.startswith("end: "):
                    ends[e.name[5:]].append(e.start_ns)
                elif e.duration_ns > 0 and not _RUNTIME_EVENT.match(e.name):
                    starts[e.name].append((e.start_ns, e.start_ns + e.duration_ns))
    return [event for name, spans in starts.items() for event in pair_end_marks(name, spans, ends.get(name, []))]


def pair_end_marks(name: str, spans: list[tuple[int, int]], end_marks: list[int]) -> list[tuple[int, int, str]]:
    """Each ``(start, event_end)`` of op ``name`` extended to its ``end:`` mark (see :func:`trace_events`)."""
    marks = sorted(end_marks)
    out, i = [], 0
    for start, event_end in sorted(spans):
        while i < len(marks) and marks[i] < start:
            i += 1
        end = event_end
        if i < len(marks):
            end = max(end, marks[i])
            i += 1
        out.append((start, end, name))
    return out


def attribute_wall_time(events: Iterable[tuple[int, int, str]]) -> dict[str, float]:
    """Wall seconds per event name: every instant's time is shared equally among the events running then."""
    points = []
    for start, end, name in events:
        points.append((start, 1, name))
        points.append((end, -1, name))
    points.sort(key=lambda p: (p[0], p[1]))
    active: dict[str, int] = {}  # name -> how many of its events are running
    running = 0
    out: dict[str, float] = defaultdict(float)
    last = 0
    for t, kind, name in points:
        if running and t > last:
            share = (t - last) / running / 1e9
            for k, c in active.items():
                out[k] += share * c
        count = active.get(name, 0) + kind
        if count > 0:
            active[name] = count
        else:
            active.pop(name, None)
        running += kind
        last = t
    return dict(out)


def class_split(
    per_op_s: Mapping[str, float], instrs: Mapping[str, HloInstruction], *, wall_s: float, steps: int
) -> dict[str, Any]:
    """Seconds per step by class (plus the biggest ops of each class), the rest of the wall time as ``runtime``."""
    by_class: dict[str, float] = defaultdict(float)
    top: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name, secs in per_op_s.items():
        instr = instrs.get(name)
        cls = classify_instruction(instr) if instr is not None else OTHER
        by_class[cls] += secs / steps
        label = name
        if instr is not None:
            label += f" [{instr.op_name.removeprefix('jit(step_fn)/')}]"
            if instr.frame:
                label += f" {os.path.basename(instr.frame[0])}:{instr.frame[2]}"
        top[cls].append((secs / steps, label))
    step_s = wall_s / steps
    by_class[RUNTIME] = max(step_s - sum(by_class.values()), 0.0)
    return {
        "step_s": step_s,
        "seconds": {c: by_class.get(c, 0.0) for c in OP_CLASSES},
        "top_ops": {c: [[round(s, 5), n] for s, n in sorted(top[c], reverse=True)[:5]] for c in OP_CLASSES if top[c]},
    }


def profile_jax_step(
    step: Callable[[], None], hlo_text: str, *, steps: int = 2, trace_dir: str | None = None
) -> dict[str, Any]:
    """Runs ``step`` (already warm) ``steps`` times under ``jax.profiler`` and splits its time by op class.

    Args:
      step: one train step that blocks until done (a :class:`train.bench.runner.Runner`'s ``step``).
      hlo_text: the compiled step's optimized HLO (``compiled.as_text()``).
      steps: steps traced; the split is per step.
      trace_dir: where the trace goes (a temporary folder by default, removed afterwards).
    """
    import jax

    instrs = parse_hlo(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        where = trace_dir or tmp
        jax.profiler.start_trace(where)
        start = time.perf_counter()
        try:
            for _ in range(steps):
                step()
        finally:
            wall_s = time.perf_counter() - start
            jax.profiler.stop_trace()
        paths = sorted(glob.glob(os.path.join(where, "plugins", "profile", "*", "*.xplane.pb")))
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no *.xplane.pb under {where}")
        events = trace_events(paths[-1])
    per_op = attribute_wall_time(events)
    split = class_split(per_op, instrs, wall_s=wall_s, steps=steps)
    split.update(framework="jax", steps=steps, unknown_events=sorted(n for n in per_op if n not in instrs)[:20])
    return split
