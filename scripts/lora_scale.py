"""The LoRA rows of docs/scale.md: the paper's models with LoRA adapters (bf16 base) and QLoRA (nf4 base) on the
smallest TPU v5e slices, `finch-train compile --max-batch` for each cell (memory only: no FLOP counts).

    nice -n 19 .venv/bin/python scripts/lora_scale.py          # compile what is missing, then write the table
    .venv/bin/python scripts/lora_scale.py --render            # only rewrite the table from docs/scale/lora/*.json

Every cell comes from the compile command printed before it runs and kept in its JSON (docs/scale/lora/); a cell
that exists is not compiled again, so the script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "scale" / "lora"
DOC = ROOT / "docs" / "scale.md"
START, END = "<!-- lora-table:start -->", "<!-- lora-table:end -->"

MODELS = ("llama3-8b", "qwen3-4b")
TOPOLOGIES = ("v5e-1", "v5e-4", "v5e-8")
# name -> overrides: rank-16 adapters on every projection, fp32 (adapters and their Adam state); the frozen base in
# bf16, or in nf4 with everything else (embeddings, norms) in bf16.
VARIANTS = {
    "lora": ("model.lora.rank=16", "model.param_dtype=bfloat16"),
    "qlora": ("model.lora.rank=16", "model.param_dtype=bfloat16", "model.lora.quantize=nf4"),
}
SEQ = 2048
SETTINGS = (f"data.seq_len={SEQ}", "model.attention_impl=splash")


def _path(model: str, variant: str, topology: str) -> Path:
    return OUT / f"{model}_{variant}_{topology}.json"


def command(model: str, variant: str, topology: str) -> list[str]:
    return [
        *("python", "-m", "train", "compile", "--topology", topology, "--model", f"preset:{model}"),
        *("--max-batch", "--no-estimate", "--out", str(_path(model, variant, topology).relative_to(ROOT))),
        *SETTINGS,
        *VARIANTS[variant],
    ]


def _compile(model: str, variant: str, topology: str) -> None:
    cmd = command(model, variant, topology)
    path = _path(model, variant, topology)
    print("$ " + shlex.join(cmd), flush=True)
    began = time.time()
    with open(path.with_suffix(".log"), "w") as log:
        code = subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        print(f"  failed (exit {code}); see {path.with_suffix('.log')}", flush=True)
        return
    report = json.loads(path.read_text())
    report["command"], report["wall_seconds"] = shlex.join(cmd), time.time() - began
    path.write_text(json.dumps(report, indent=2))
    print(f"  {_row(model, variant, report)}  [{report['wall_seconds'] / 60:.0f} min]", flush=True)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _row(model: str, variant: str, r: dict) -> str:
    m, found = r["memory_per_chip"], r["max_batch"]
    rows = found["rows_per_chip"]
    state = m.get("state", {})
    if rows:
        parts = (state["params"] + state["optimizer_state"], state.get("frozen_base", 0), m["total"], m["hbm"])
        memory = " | ".join(_gib(x) for x in parts)
        batch = f"{found['global_batch']} × {SEQ} ({rows}/chip)"
    else:
        memory, batch = f"— | — | XLA refused | {_gib(m['hbm'])}", "**does not fit** (1 row/chip)"
    return f"| {model} | {variant} | {r['topology']['name']} | {r['topology']['chips']} | {memory} | {batch} |"


def render() -> str:
    lines = [
        "| model | variant | topology | chips | GiB adapters + Adam | GiB frozen base | GiB total (at that batch) "
        "| HBM GiB | largest global batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    commands = []
    for model in MODELS:
        for variant in VARIANTS:
            for topology in TOPOLOGIES:
                path = _path(model, variant, topology)
                if not path.exists():
                    lines.append(f"| {model} | {variant} | {topology} | | not compiled yet | | | | |")
                    continue
                report = json.loads(path.read_text())
                lines.append(_row(model, variant, report))
                commands.append(f"{report['command']}   # {report.get('wall_seconds', 0) / 60:.0f} min")
    return "\n".join([*lines, "", "Commands (run by `scripts/lora_scale.py`):", "", "```", *commands, "```"])


def write_doc(table: str) -> None:
    text = DOC.read_text()
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="only rewrite the table from existing runs")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.render:
        for model in MODELS:
            for variant in VARIANTS:
                for topology in TOPOLOGIES:
                    if not _path(model, variant, topology).exists():
                        _compile(model, variant, topology)
    write_doc(render())
    print(f"wrote the LoRA table of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
