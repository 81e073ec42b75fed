"""Wall time and peak RSS of `edgediff export` of a full-size architecture, one fresh process per precision.

    python -m edgediff.benchmarks.export_memory --model sd15 --precision fp16 --optimize-for cuda
    python -m edgediff.benchmarks.export_memory --model sd21 --precision fp16 fp32 int8
    python -m edgediff.benchmarks.export_memory --model sd15 --precision int4 --keep --work DIR

The model is built once with random weights (benchmarks.models.ensure_model); each export runs as
its own `edgediff export` process, whose peak RSS is read back from the kernel (wait4's ru_maxrss,
the VmHWM the OOM killer judges) and from the export's own final line. Full-size runs need several
GiB: on a shared machine run this under a lock, e.g. `flock LOCKFILE python -m ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .models import default_cache, ensure_model

GIB = 1024**3


def export_once(source: Path, out: Path, precision: str, target: str | None, log_file: Path) -> dict:
    command = [sys.executable, "-m", "edgediff", "export", str(source), str(out), "--precision", precision,
               "--overwrite", *(["--optimize-for", target] if target else [])]
    started = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    lines = log_file.read_text().splitlines()
    validation = [line for line in lines if ": validate " in line or "not validated" in line]
    return {
        "precision": precision, "optimize_for": target or "default", "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
        "final_line": lines[-1] if lines else "", "validation": validation,
        "command": " ".join(["edgediff", *command[3:]]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="sd15, sd21 or a diffusers config folder")
    parser.add_argument("--precision", nargs="+", default=["fp16", "fp32", "int8"], choices=["fp16", "fp32", "int8", "int4"])
    parser.add_argument("--optimize-for", default=None, help="target for every precision [default: the export's]")
    parser.add_argument("--cache", type=Path, default=None, help="built models [default: ~/.cache/edgediff/bench]")
    parser.add_argument("--work", type=Path, default=None, help="where exports are written, then deleted")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per export here")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    args = parser.parse_args(argv)

    source = ensure_model(args.model, args.cache or default_cache())
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=args.work))
    print(f"model {args.model} ({source}); cpu {platform.processor() or platform.machine()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    failed = False
    for precision in args.precision:
        out = work / f"{args.model}-{precision}"
        result = export_once(source, out, precision, args.optimize_for, work / f"{precision}.log")
        result.update(model=args.model, load_average=[round(x, 2) for x in os.getloadavg()])
        for line in result["validation"]:
            print(f"  {line}")
        print(f"{args.model} {precision:5s} {result['optimize_for']:7s} exit {result['exit_code']}  "
              f"wall {result['wall_s']:7.1f} s  peak RSS {result['peak_rss_gib']:5.2f} GiB  | {result['final_line']}",
              flush=True)
        if result["exit_code"] != 0:
            failed = True
            print("\n".join((work / f"{precision}.log").read_text().splitlines()[-5:]), flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
