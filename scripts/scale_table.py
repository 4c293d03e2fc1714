"""Make the table of docs/scale.md: `finch-train compile --max-batch` for each model, TPU topology and slice count.

    nice -n 19 .venv/bin/python scripts/scale_table.py --jobs 2   # compile what is missing, then write the table
    .venv/bin/python scripts/scale_table.py --render               # only rewrite the table from docs/scale/*.json
    .venv/bin/python scripts/scale_table.py --only qwen3-4b        # one model

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.compile import roofline  # noqa: E402

OUT = ROOT / "docs" / "scale"  # the reports the table cites are committed beside docs/scale.md
DOC = ROOT / "docs" / "scale.md"
START, END = "<!-- scale-table:start -->", "<!-- scale-table:end -->"

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


def _refresh_estimate(r: dict) -> bool:
    """Recomputes the estimate from the report's counts with today's roofline (reports written before a fix to
    it keep their compiles; only the arithmetic is redone). True if it changed."""
    if not r["max_batch"]["rows_per_chip"] or "estimate" not in r:
        return False
    e, chip, flops = r["estimate"], r["chip"], r["flops"]
    r["estimate"] = roofline(
        tokens=r["batch"]["tokens_per_step"],
        model_flops=e["model_flops_per_step"],
        chips=r["topology"]["chips"],
        peak_flops=chip["peak_bf16_flops"],
        hbm_bytes_per_second=chip["hbm_bytes_per_second"],
        xla_flops_per_chip=flops["xla_flops_per_chip"],
        xla_hbm_bytes_per_chip=flops["xla_hbm_bytes_per_chip"],
        remat=r["model"]["remat"],
    )
    return r["estimate"] != e


def _per_chip_as_one_slice(report: dict, one_slice: dict) -> None:
    """A multi-slice cell's estimate, from the one-slice cell at the same rows per chip: each chip runs the same
    program on the same rows (the slices only add a gradient all-reduce over the data-center network, which the
    roofline ignores anyway), so step time and MFU are the one slice's and tokens/s scale with the chips."""
    rows = report["max_batch"]["rows_per_chip"]
    if not rows or rows != one_slice["max_batch"]["rows_per_chip"] or "estimate" not in one_slice:
        return
    e = one_slice["estimate"]
    scale = report["topology"]["chips"] / one_slice["topology"]["chips"]
    report["estimate"] = {**e, "tokens_per_second": e["tokens_per_second"] * scale, "per_chip_as_one_slice": True}


def _row(r: dict) -> str:
    t, b, m, found = r["topology"], r["batch"], r["memory_per_chip"], r["max_batch"]
    rows = found["rows_per_chip"]
    name = r["model"]["source"].split(":", 1)[-1]
    memory = f"{_gib(m['total'])} / {_gib(m['hbm'])}" if "total" in m else f"XLA refused / {_gib(m['hbm'])}"
    if rows:
        batch = f"{found['global_batch']} × {b['seq_len']} ({rows}/chip)"
        why = "the counting compiles did not fit" if "estimate_unavailable" in r else "not counted"
        tail = f"no estimate ({why}) | — | —"
        if "estimate" in r:
            e = r["estimate"]
            tail = f"{e['step_seconds']:.2f} | {e['tokens_per_second'] / 1e3:,.0f}k | {100 * e['mfu']:.0f}%"
            tail += " (as 1 slice)" if e.get("per_chip_as_one_slice") else ""
    else:
        batch, tail = "— (1 row/chip does not fit)", "— | — | —"
    fits = "yes" if rows else "**no**"
    return (
        f"| {name} | {b['seq_len']} | {t['name']} | {t['slices']} | {t['chips']} | {memory} | {fits} | {batch} | "
        f"{tail} |"
    )


def render() -> str:
    lines = [
        "| model | seq | topology | slices | chips | GiB per chip (at that batch) / HBM | fits | largest global "
        "batch (rows × seq) | est. step s | est. tokens/s | est. MFU |",
        "|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    commands = []
    rendered: dict[tuple[str, str, int], dict] = {}  # slice counts run upwards: a cell's one-slice report is here
    for model, _, topologies, slice_counts in RUNS:
        for topology in topologies:
            for slices in slice_counts:
                path = _path(model, topology, slices)
                if not path.exists():
                    lines.append(f"| {model} | | {topology} | {slices} | | not compiled yet | | | | | |")
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
    return "\n".join(lines + ["", "Commands (run by `scripts/scale_table.py`, wall time on the shared 2-core VM):", "",
                              "```", *commands, "```"])  # fmt: skip


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only rewrite the table from existing runs")
    parser.add_argument("--only", action="append", default=[], help="model preset(s) to compile")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (each keeps about one core busy)")
    args = parser.parse_args()
    if not args.render:
        run_missing(set(args.only), max(1, args.jobs))
    table = render()
    write_doc(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
