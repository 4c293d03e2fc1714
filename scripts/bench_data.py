"""The data path's benchmark (issue 22): first build of the token cache, a cache hit, memory while reading batches.

    python scripts/make_big_jsonl.py --tokens 100M --out /tmp/big100m.jsonl
    python scripts/bench_data.py --file /tmp/big100m.jsonl --label 100M --out docs/bench/data.json

Each phase runs in its own process under ``/usr/bin/time -v`` (wall time and peak RSS of the whole process):

* ``build``: process start -> the token cache entry published, from an empty cache directory (SmolLM2's tokenizer,
  ``seq_len`` 512); tokens/s end to end, peak RSS, bytes per token on disk.
* ``hit``: process start -> the first global batch on the device, with the entry already built: the tokenizer load
  (part of the model load in ``finetune``) is timed apart, and there is no model, so nothing to compile.
* ``memory``: the data's resident memory while reading batches: RSS after the imports and the tokenizer, then after
  opening the entry and reading ``--batches`` batches of 16 x 512 in the training order (``ResumableLoader``); the
  peak is sampled inside every 25th batch, just before its mapped pages are released.

Results are merged into ``--out`` under ``--label`` (other labels are kept), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _since_start() -> float:
    """Seconds since this process started (from /proc, so imports count)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _tokenizer(name: str):
    import models

    if name == "byte":
        return models.ByteTokenizer()
    from models.gguf_loader import read_gguf, smollm2_gguf_path

    path = smollm2_gguf_path() if name == "gguf:smollm2" else Path(name.removeprefix("gguf:"))
    header, _ = read_gguf(path, tensors=False)
    return models.Tokenizer.from_gguf_fields(header, str(path))


def _data_cfg(args):
    from train.config import DataConfig

    return DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, train_files=(args.file,))


def phase_build(args) -> dict:
    from train import data as data_lib

    tokenizer = _tokenizer(args.tokenizer)
    t0 = _since_start()
    split = data_lib.load_split(
        tokenizer, _data_cfg(args), [args.file], cache_dir=args.cache_dir, progress=args.progress
    )
    t1 = _since_start()
    entry = split.cache
    return {
        "tokens": split.tokens,
        "documents": split.documents,
        "rows": len(split.rows),
        "fill": round(split.rows.fill, 4),
        "tokenizer_loaded_s": round(t0, 2),
        "build_s": round(entry.meta["build_seconds"], 2),
        "published_s": round(t1, 2),
        "tokens_per_s_end_to_end": round(split.tokens / t1),
        "tokens_per_s_build": round(split.tokens / entry.meta["build_seconds"]),
        "disk_bytes": entry.disk_bytes,
        "disk_bytes_per_token": round(entry.disk_bytes / split.tokens, 3),
        "hit": entry.hit,
    }


def phase_hit(args) -> dict:
    import jax
    import numpy as np

    from train import data as data_lib

    t_imports = _since_start()
    t = time.perf_counter()
    tokenizer = _tokenizer(args.tokenizer)
    tokenizer_s = time.perf_counter() - t
    split = data_lib.load_split(tokenizer, _data_cfg(args), [args.file], cache_dir=args.cache_dir)
    t_mapped = _since_start()
    loader = data_lib.ResumableLoader(split.rows, args.batch_size, seed=0)
    batch = loader.next_batch()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    jax.block_until_ready(placed)
    t_batch = _since_start()
    assert split.cache.hit, "the entry was not there: run the build phase first"
    return {
        "imports_s": round(t_imports, 2),
        "tokenizer_s": round(tokenizer_s, 2),
        "mapped_s": round(t_mapped, 2),
        "first_batch_on_device_s": round(t_batch, 2),
        "first_batch_excluding_tokenizer_s": round(t_batch - tokenizer_s, 2),
    }


def phase_memory(args) -> dict:
    import numpy as np

    from train import data as data_lib

    tokenizer = _tokenizer(args.tokenizer)
    before = _status()
    split = data_lib.load_split(tokenizer, _data_cfg(args), [args.file], cache_dir=args.cache_dir)
    loader = data_lib.ResumableLoader(split.rows, args.batch_size, seed=0)
    peak = dict(before)
    release, calls = split.rows._release, [0]

    def sampled_release() -> None:  # the resident set just before the rows' pages are dropped: its high point
        nonlocal peak
        calls[0] += 1
        if calls[0] % 25 == 0:
            now = _status()
            peak = {k: max(peak[k], now[k]) for k in peak}
        release()

    split.rows._release = sampled_release
    times = []
    for _ in range(args.batches):
        t = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - t)
    after = _status()
    peak = {k: max(peak[k], after[k]) for k in peak}
    return {
        "batches": args.batches,
        "rows_read": args.batches * args.batch_size,
        "rows_in_data": len(split.rows),
        "rss_before_bytes": before["VmRSS"],
        "rss_after_bytes": after["VmRSS"],
        "data_rss_bytes": after["VmRSS"] - before["VmRSS"],
        "data_rss_peak_bytes": peak["VmRSS"] - before["VmRSS"],
        "data_rss_anon_peak_bytes": peak["RssAnon"] - before["RssAnon"],
        "data_rss_file_peak_bytes": peak["RssFile"] - before["RssFile"],
        "batch_read_median_ms": round(1e3 * float(np.median(times)), 3),
    }


PHASES = {"build": phase_build, "hit": phase_hit, "memory": phase_memory}


def _time_v(stderr: str) -> dict:
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    out = {}
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        out["wall_s"] = round(sum(p * 60**i for i, p in enumerate(reversed(parts))), 2)
    if rss:
        out["max_rss_bytes"] = int(rss.group(1)) * 1024
    user = re.search(r"User time \(seconds\): (\S+)", stderr)
    system = re.search(r"System time \(seconds\): (\S+)", stderr)
    share = re.search(r"Percent of CPU this job got: (\d+)%", stderr)
    if user and system:
        out["cpu_s"] = round(float(user.group(1)) + float(system.group(1)), 2)
    if share:
        out["cpu_percent"] = int(share.group(1))
    return out


def _run_phase(name: str, args, cache_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--file", args.file, "--cache-dir", cache_dir]
    cmd += ["--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    cmd += ["--batches", str(args.batches)] + (["--progress"] if args.progress and name == "build" else [])
    if os.path.exists("/usr/bin/time"):
        cmd = ["/usr/bin/time", "-v"] + cmd
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = os.getloadavg()
    print(f"[bench_data] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(_time_v(proc.stderr))
    result["loadavg_1m_before_after"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]
    print(f"[bench_data] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", required=True, help="the JSONL to benchmark (scripts/make_big_jsonl.py)")
    parser.add_argument("--label", default="", help="the name of this measurement in --out (e.g. 100M)")
    parser.add_argument("--out", default="", help="a JSON file to merge the results into")
    parser.add_argument("--note", default="", help="what else the machine was doing")
    parser.add_argument("--tokenizer", default="gguf:smollm2", help="gguf:smollm2, gguf:PATH or byte")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2000, help="batches read in the memory phase")
    parser.add_argument("--cache-dir", default="", help="(phases) the cache directory; default: a fresh temporary one")
    parser.add_argument("--progress", action="store_true", help="draw the tokenizing progress bar")
    parser.add_argument(
        "--phases", default="build,hit,memory", help="phases to run (hit and memory need --cache-dir with the entry)"
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)), flush=True)
        return 0
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="finch-bench-tokens-")
    try:
        results = {name: _run_phase(name, args, cache_dir) for name in args.phases.split(",")}
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    record = {
        "file": args.file,
        "file_bytes": os.path.getsize(args.file),
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "note": args.note,
        **results,
    }
    print(json.dumps(record, indent=1))
    if args.out:
        out = Path(args.out)
        existing = json.loads(out.read_text()) if out.is_file() else {}
        label = args.label or Path(args.file).stem
        existing[label] = {**existing.get(label, {}), **record}  # phases not run this time are kept
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(existing, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
