"""Make the tables of docs/scale.md: `finch-train compile --max-batch` for each model, TPU topology and slice count;
the communication of each of those steps; and Llama-2-70B at MaxText's published settings, beside MaxText's MFU.

    nice -n 19 .venv/bin/python scripts/scale_table.py --jobs 2   # compile what is missing, then write the tables
    .venv/bin/python scripts/scale_table.py --render               # only rewrite the tables from docs/scale/*.json
    .venv/bin/python scripts/scale_table.py --only qwen3-4b        # one model
    nice -n 10 .venv/bin/python scripts/scale_table.py --comm      # each cell's collectives, one compile per cell
    nice -n 10 .venv/bin/python scripts/scale_table.py --maxtext   # the Llama-2-70B cells (tens of minutes each)

Every cell comes from a compile command this script runs (printed before it runs, and kept in the JSON next to its
report in docs/scale/); a run that exists is not repeated, so the script resumes after an interruption. The two-slice
search starts from the one-slice answer: per chip, two slices hold the same params and activations as one; a
one-slice search starts from the answer on a smaller slice of the same chip, if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.chips import TPU_CHIPS  # noqa: E402
from train.compile import roofline  # noqa: E402

OUT = ROOT / "docs" / "scale"  # the reports the table cites are committed beside docs/scale.md
DOC = ROOT / "docs" / "scale.md"
START, END = "<!-- scale-table:start -->", "<!-- scale-table:end -->"
MAXTEXT_START, MAXTEXT_END = "<!-- maxtext-table:start -->", "<!-- maxtext-table:end -->"

PAPER_TOPOLOGIES = ("v5e-16", "v5e-64", "v5p-16", "v5p-64", "v4-32")
# (model preset, sequence length, topologies, slice counts), in the order they are compiled
RUNS = (
    ("qwen3-4b", 2048, PAPER_TOPOLOGIES, (1, 2)),
    ("llama3-8b", 4096, PAPER_TOPOLOGIES, (1, 2)),
    ("qwen3-0.6b", 2048, ("v5e-16", "v5p-16"), (1,)),
    ("smollm2-135m", 2048, ("v5e-16", "v5p-16"), (1,)),
)
# The paper's setting: finch_adamw (the default optimizer), fp32 master weights and Adam state, bf16 compute; layers
# scanned and rematerialised (compile's pod defaults); TPU splash attention.
SETTINGS = ("model.attention_impl=splash",)

# MaxText's Llama-2-70B training MFU (its getting_started/Run_Llama2.md, bf16) and the settings it documents for it:
# (topology, rows per chip, sequence length, measured MFU, where the settings come from). MaxText counts
# per_device_batch_size per chip (one JAX device per v5p/v4 chip). Our step keeps its own remat (full: the
# lightest policy we have that fits) and optimizer (finch_adamw; MaxText runs AdamW).
MAXTEXT_MODEL = "llama2-70b"
MAXTEXT = (
    ("v5p-128", 4, 4096, 0.65, "MaxText/configs/v5p/llama2_70b.sh: per_device_batch_size=4, max_target_length=4096, "
     "remat_policy=save_dot_except_mlpwi"),
    ("v5e-256", 2, 2048, 0.57, "MaxText/configs/v5e/llama2_70b.sh: per_device_batch_size=2, remat_policy="
     "qkv_proj_offloaded, max_target_length from base.yml: 2048"),
    ("v4-128", 1, 2048, 0.57, "not documented (MaxText has no v4 Llama-2 config): 1 row of base.yml's 2048 "
     "tokens per chip, the most that fits our step (2 rows: 33.3 GiB of 32; 4 rows: XLA refused it)"),
)  # fmt: skip


def _path(model: str, topology: str, slices: int) -> Path:
    return OUT / f"{model}_{topology}_x{slices}.json"


def command(model: str, seq: int, topology: str, slices: int, start_rows: int | None) -> list[str]:
    cmd = [
        "python",
        "-m",
        "train",
        "compile",
        "--topology",
        topology,
        "--num-slices",
        str(slices),
        "--model",
        f"preset:{model}",
    ]
    cmd += [f"data.seq_len={seq}", *SETTINGS, "--max-batch"]
    if start_rows:
        cmd.append(str(start_rows))
    if slices > 1:  # per chip the step is the one-slice step (see _per_chip_as_one_slice): memory only
        cmd.append("--no-estimate")
    return cmd + ["--out", str(_path(model, topology, slices).relative_to(ROOT))]


def _compile_order() -> list[tuple[str, int, str, int]]:
    """Every (model, seq, topology, slices) of RUNS: the paper's models on one slice first (the two-slice searches
    start from their answers), then their two-slice runs, then the small models; in RUNS order within each."""
    cells = [(m, seq, t, n) for m, seq, topologies, counts in RUNS for t in topologies for n in counts]
    paper = {RUNS[0][0], RUNS[1][0]}
    return sorted(cells, key=lambda cell: (cell[0] not in paper, cell[3] > 1))


def _prerequisites(model: str, seq: int, topology: str, slices: int) -> list[tuple[str, int, str, int]]:
    """The cells whose answers this cell's search starts from: for two slices, the one-slice cell (per chip, two
    slices hold the same params and activations as one); for one slice, the smaller slices of the same chip (a
    wider fsdp leaves each chip at least as much room)."""
    if slices > 1:
        return [(model, seq, topology, 1)]
    chip, size = topology.split("-")
    smaller = [t for t in PAPER_TOPOLOGIES if t.startswith(chip + "-") and int(t.split("-")[1]) < int(size)]
    return [(model, seq, t, 1) for t in smaller]


def _start_rows(model: str, seq: int, topology: str, slices: int) -> int | None:
    """Where the search for the largest batch starts: the largest answer of the cell's prerequisites that ran.
    None: start from 1 row."""
    done = [_path(m, t, n) for m, _, t, n in _prerequisites(model, seq, topology, slices)]
    answers = [json.loads(path.read_text())["max_batch"]["rows_per_chip"] for path in done if path.exists()]
    return max(answers) or None if answers else None


def run_missing(only: set[str], jobs: int) -> None:
    """Compiles every missing cell, ``jobs`` at a time (an XLA compile keeps about one core busy). A cell waits
    while a cell its search starts from is still to run, and is left to another run of this script that is
    compiling it (its ``.running`` marker names a live process)."""
    OUT.mkdir(parents=True, exist_ok=True)
    pending = [
        (model, seq, topology, slices)
        for model, seq, topology, slices in _compile_order()
        if (not only or model in only) and not _path(model, topology, slices).exists()
    ]
    running: dict[tuple[str, int, str, int], tuple[subprocess.Popen, list[str], float]] = {}
    while pending or running:
        for cell in list(pending):
            if _path(cell[0], cell[2], cell[3]).exists():  # finished by another run
                pending.remove(cell)
                continue
            waiting = [c for c in _prerequisites(*cell) if c in pending or c in running]
            if len(running) < jobs and not waiting and not _running_elsewhere(cell):
                pending.remove(cell)
                running[cell] = _start(*cell)
        time.sleep(2)
        for cell, (process, cmd, began) in list(running.items()):
            if process.poll() is not None:
                del running[cell]
                _marker(cell).unlink(missing_ok=True)
                _finish(_path(cell[0], cell[2], cell[3]), cmd, process.returncode, began)


def _marker(cell: tuple[str, int, str, int]) -> Path:
    return _path(cell[0], cell[2], cell[3]).with_suffix(".running")


def _running_elsewhere(cell: tuple[str, int, str, int]) -> bool:
    try:
        os.kill(int(_marker(cell).read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def _start(model: str, seq: int, topology: str, slices: int) -> tuple[subprocess.Popen, list[str], float]:
    cmd = command(model, seq, topology, slices, _start_rows(model, seq, topology, slices))
    print("$ " + shlex.join(cmd), flush=True)
    with open(_path(model, topology, slices).with_suffix(".log"), "w") as log:
        process = subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    _marker((model, seq, topology, slices)).write_text(str(process.pid))
    return process, cmd, time.time()


def _finish(path: Path, cmd: list[str], code: int, began: float) -> None:
    if code != 0:
        print(f"  failed (exit {code}): {shlex.join(cmd)}; see {path.with_suffix('.log')}", flush=True)
        return
    report = json.loads(path.read_text())
    report["command"] = shlex.join(cmd)
    report["wall_seconds"] = time.time() - began
    path.write_text(json.dumps(report, indent=2))
    print(f"  {_row(report)}  [{report['wall_seconds'] / 60:.0f} min]", flush=True)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _run_queue(tasks: list[tuple[Path, list[str], Any]]) -> None:
    """Runs ``(output, command, on_finish)`` tasks one at a time, skipping those whose output exists (so an
    interrupted run resumes); each command's output goes to ``output``'s ``.log``."""
    for out, cmd, on_finish in tasks:
        if out.exists():
            continue
        print("$ " + shlex.join(cmd), flush=True)
        began = time.time()
        with open(out.with_suffix(".log"), "w") as log:
            code = subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if code != 0 or not out.exists():
            print(f"  failed (exit {code}): see {out.with_suffix('.log')}", flush=True)
            continue
        on_finish(out, cmd, time.time() - began)


def _comm_path(path: Path) -> Path:
    return path.with_name(path.stem + ".comm.json")


def comm_command(report: dict, path: Path) -> list[str]:
    """The compile of a cell's step at the batch its search found, memory only: its HLO gives the collectives."""
    t, b = report["topology"], report["batch"]
    return [
        "python", "-m", "train", "compile", "--topology", t["name"], "--num-slices", str(t["slices"]),
        "--model", report["model"]["source"], f"data.seq_len={b['seq_len']}", *SETTINGS,
        f"data.batch_size={b['global_rows']}", "--no-estimate", "--out", str(_comm_path(path).relative_to(ROOT)),
    ]  # fmt: skip


def run_comm(only: set[str]) -> None:
    """Counts the collectives of every cell that has none yet: one compile of the cell's step at its batch. The
    count (and that compile's command and time) goes into the cell's report; the compile's own report stays
    beside it (``.comm.json``) with the memory it measured, which must equal the search's."""
    tasks = []
    for model, _, topologies, slice_counts in RUNS:
        for topology in topologies:
            for slices in slice_counts:
                path = _path(model, topology, slices)
                if (only and model not in only) or not path.exists():
                    continue
                report = json.loads(path.read_text())
                if "collectives_per_chip" in report or not report["max_batch"]["rows_per_chip"]:
                    continue
                tasks.append((_comm_path(path), comm_command(report, path), _merge_comm(path)))
    _run_queue(tasks)


def _merge_comm(path: Path) -> Any:
    def merge(out: Path, cmd: list[str], seconds: float) -> None:
        report, counted = json.loads(path.read_text()), json.loads(out.read_text())
        report["collectives_per_chip"] = counted["collectives_per_chip"]
        report["collectives_command"] = shlex.join(cmd)
        report["collectives_wall_seconds"] = seconds
        report["collectives_memory_total"] = counted["memory_per_chip"]["total"]  # the same program: same memory
        path.write_text(json.dumps(report, indent=2))
        print(f"  {_row(report)}  [{seconds / 60:.0f} min]", flush=True)

    return merge


def _maxtext_path(topology: str) -> Path:
    return OUT / f"{MAXTEXT_MODEL}_{topology}_x1.json"


def maxtext_command(topology: str, rows: int, seq: int) -> list[str]:
    from train.topology import parse_topology  # noqa: PLC0415 - only here: the table renders without jax

    chips = parse_topology(topology).num_chips
    return [
        "python", "-m", "train", "compile", "--topology", topology, "--model", f"preset:{MAXTEXT_MODEL}",
        f"data.seq_len={seq}", f"data.batch_size={rows * chips}", *SETTINGS,
        "--out", str(_maxtext_path(topology).relative_to(ROOT)),
    ]  # fmt: skip


def run_maxtext() -> None:
    """Compiles Llama-2-70B at MaxText's settings on each MaxText topology (one compile and its two counting
    compiles each), resumably."""

    def finish(out: Path, cmd: list[str], seconds: float) -> None:
        report = json.loads(out.read_text())
        report["command"], report["wall_seconds"] = shlex.join(cmd), seconds
        out.write_text(json.dumps(report, indent=2))
        print(f"  done in {seconds / 60:.0f} min", flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    _run_queue([(_maxtext_path(t), maxtext_command(t, rows, seq), finish) for t, rows, seq, _, _ in MAXTEXT])


def _links(r: dict) -> dict:
    """The report's chip with today's link bandwidths (train.chips): reports written before they were in the table
    keep their compiles; the bandwidths are constants, not measurements."""
    chip = TPU_CHIPS[r["chip"]["name"]]
    r["chip"].update(
        ici_bytes_per_second=chip.ici_bytes_per_second,
        dcn_bytes_per_second=chip.dcn_bytes_per_second,
        network_source=chip.network_source,
    )
    return r["chip"]


def _estimate_of(r: dict, counts: dict, model_flops: float) -> dict:
    chip, moved = _links(r), r.get("collectives_per_chip") or {}
    return roofline(
        tokens=r["batch"]["tokens_per_step"],
        model_flops=model_flops,
        chips=r["topology"]["chips"],
        peak_flops=chip["peak_bf16_flops"],
        hbm_bytes_per_second=chip["hbm_bytes_per_second"],
        xla_flops_per_chip=counts["xla_flops_per_chip"],
        xla_hbm_bytes_per_chip=counts["xla_hbm_bytes_per_chip"],
        remat=r["model"]["remat"],
        ici_bytes_per_chip=moved.get("ici_bytes", 0.0),
        dcn_bytes_per_chip=moved.get("dcn_bytes", 0.0),
        ici_bytes_per_second=chip["ici_bytes_per_second"],
        dcn_bytes_per_second=chip["dcn_bytes_per_second"],
    )


def _refresh_estimate(r: dict) -> bool:
    """Recomputes the estimate from the report's counts with today's roofline and the cell's collectives (reports
    written before a fix to it keep their compiles; only the arithmetic is redone). True if it changed."""
    if not r["max_batch"]["rows_per_chip"] or "estimate" not in r or r["estimate"].get("per_chip_as_one_slice"):
        return False
    e = r["estimate"]
    r["estimate"] = _estimate_of(r, r["flops"], e["model_flops_per_step"])
    return r["estimate"] != e


def _per_chip_as_one_slice(report: dict, one_slice: dict) -> None:
    """A multi-slice cell's estimate, from the one-slice cell at the same rows per chip: each chip runs the same
    program on the same rows, so its FLOPs and HBM bytes are the one slice's; the collectives are the multi-slice
    program's own (its ICI traffic, and the gradient all-reduce over the data-center network)."""
    rows = report["max_batch"]["rows_per_chip"]
    if not rows or rows != one_slice["max_batch"]["rows_per_chip"] or "estimate" not in one_slice:
        return
    scale = report["topology"]["chips"] / one_slice["topology"]["chips"]
    model_flops = one_slice["estimate"]["model_flops_per_step"] * scale
    report["estimate"] = {**_estimate_of(report, one_slice["flops"], model_flops), "per_chip_as_one_slice": True}


def _range(a: float, b: float, fmt: str) -> str:
    return format(a, fmt) if format(a, fmt) == format(b, fmt) else f"{format(a, fmt)} .. {format(b, fmt)}"


def _row(r: dict) -> str:
    t, b, m, found = r["topology"], r["batch"], r["memory_per_chip"], r["max_batch"]
    rows = found["rows_per_chip"]
    name = r["model"]["source"].split(":", 1)[-1]
    memory = f"{_gib(m['total'])} / {_gib(m['hbm'])}" if "total" in m else f"XLA refused / {_gib(m['hbm'])}"
    moved = r.get("collectives_per_chip")
    comm = "not counted | —"
    if moved:
        comm = f"{moved['ici_bytes'] / 2**30:.1f} / {moved['dcn_bytes'] / 2**30:.2f} | "
        comm += f"{r['estimate']['ici_seconds']:.2f} / {r['estimate']['dcn_seconds']:.2f}" if "estimate" in r else "—"
    if rows:
        batch = f"{found['global_batch']} × {b['seq_len']} ({rows}/chip)"
        why = "the counting compiles did not fit" if "estimate_unavailable" in r else "not counted"
        tail = f"no estimate ({why}) | — | —"
        if "estimate" in r:
            e = r["estimate"]
            tail = (
                f"{_range(e['step_seconds'], e['step_seconds_no_overlap'], '.2f')} | "
                f"{_range(e['tokens_per_second'] / 1e3, e['tokens_per_second_no_overlap'] / 1e3, ',.0f')}k | "
                f"{_range(100 * e['mfu'], 100 * e['mfu_no_overlap'], '.0f')}%"
            )
            tail += " (as 1 slice)" if e.get("per_chip_as_one_slice") else ""
    else:
        batch, tail = "— (1 row/chip does not fit)", "— | — | —"
    fits = "yes" if rows else "**no**"
    return (
        f"| {name} | {b['seq_len']} | {t['name']} | {t['slices']} | {t['chips']} | {memory} | {fits} | {batch} | "
        f"{tail} | {comm} |"
    )


def render_maxtext() -> str:
    """Llama-2-70B at MaxText's settings: our estimate's range beside MaxText's measured MFU."""
    lines = [
        "| topology | chips | rows × seq per chip | GiB per chip / HBM | est. step s (overlap .. none) | est. MFU "
        "(overlap .. none) | bound | ICI / DCN GiB per chip | compute / HBM / ICI s | MaxText measured MFU |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    commands = []
    for topology, rows, seq, measured, _ in MAXTEXT:
        path = _maxtext_path(topology)
        if not path.exists():
            lines.append(f"| {topology} | | {rows} × {seq} | not compiled yet | | | | | | {100 * measured:.0f}% |")
            continue
        r = json.loads(path.read_text())
        m, moved = r["memory_per_chip"], r.get("collectives_per_chip") or {}
        memory = f"{_gib(m['total'])} / {_gib(m['hbm'])}" if "total" in m else f"XLA refused / {_gib(m['hbm'])}"
        memory += " **does not fit**" if "total" in m and not m.get("fits", True) else ""
        if "estimate" in r:
            e = _estimate_of(r, r["flops"], r["estimate"]["model_flops_per_step"])
            r["estimate"] = e
            path.write_text(json.dumps(r, indent=2))
            est = (
                f"{_range(e['step_seconds'], e['step_seconds_no_overlap'], '.2f')} | "
                f"{_range(100 * e['mfu'], 100 * e['mfu_no_overlap'], '.0f')}% | {e['bound']} | "
                f"{moved.get('ici_bytes', 0) / 2**30:.0f} / {moved.get('dcn_bytes', 0) / 2**30:.0f} | "
                f"{e['compute_seconds']:.2f} / {e['hbm_seconds']:.2f} / {e['ici_seconds']:.2f}"
            )
        else:
            est = "no estimate | | | | " + ("does not fit" if not m.get("fits", True) else "")
        lines.append(
            f"| {topology} | {r['topology']['chips']} | {rows} × {seq} | {memory} | {est} | {100 * measured:.0f}% |"
        )
        commands.append(f"{r.get('command', '?')}   # {r.get('wall_seconds', 0) / 60:.0f} min")
    sources = [f"* {topology}: {why}" for topology, _, _, _, why in MAXTEXT]
    return "\n".join(lines + ["", "Settings:", "", *sources, "", "```", *commands, "```"])


def render() -> str:
    lines = [
        "| model | seq | topology | slices | chips | GiB per chip (at that batch) / HBM | fits | largest global "
        "batch (rows × seq) | est. step s (overlap .. none) | est. tokens/s | est. MFU | ICI / DCN GiB per chip "
        "per step | ICI / DCN s |",
        "|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    commands = []
    rendered: dict[tuple[str, str, int], dict] = {}  # slice counts run upwards: a cell's one-slice report is here
    for model, _, topologies, slice_counts in RUNS:
        for topology in topologies:
            for slices in slice_counts:
                path = _path(model, topology, slices)
                if not path.exists():
                    lines.append(f"| {model} | | {topology} | {slices} | | not compiled yet | | | | | | | |")
                    continue
                report = json.loads(path.read_text())
                if _refresh_estimate(report):
                    path.write_text(json.dumps(report, indent=2))
                rendered[model, topology, slices] = report
                if slices > 1 and "estimate" not in report and (model, topology, 1) in rendered:
                    _per_chip_as_one_slice(report, rendered[model, topology, 1])
                lines.append(_row(report))
                commands.append(f"{report.get('command', '?')}   # {report.get('wall_seconds', 0) / 60:.0f} min")
                if "recount_command" in report:
                    commands.append(report["recount_command"] + " (FLOPs and HBM bytes recounted)")
                if "collectives_command" in report:
                    minutes = report["collectives_wall_seconds"] / 60
                    commands.append(f"{report['collectives_command']}   # {minutes:.0f} min (collectives counted)")
    return "\n".join(lines + ["", "Commands (run by `scripts/scale_table.py`, wall time on the shared 2-core VM):", "",
                              "```", *commands, "```"])  # fmt: skip


def write_doc(table: str, start: str = START, end: str = END) -> None:
    text = DOC.read_text() if DOC.exists() else f"{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only rewrite the table from existing runs")
    parser.add_argument("--only", action="append", default=[], help="model preset(s) to compile")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (each keeps about one core busy)")
    parser.add_argument("--comm", action="store_true", help="count each cell's collectives (one compile per cell)")
    parser.add_argument("--maxtext", action="store_true", help="compile Llama-2-70B at MaxText's settings")
    args = parser.parse_args()
    if args.comm:
        run_comm(set(args.only))
    elif args.maxtext:
        run_maxtext()
    elif not args.render:
        run_missing(set(args.only), max(1, args.jobs))
    table = render()
    write_doc(table)
    write_doc(render_maxtext(), MAXTEXT_START, MAXTEXT_END)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
