"""Wall time and peak RSS of `edgediff export` of a full-size architecture, one fresh process per precision.

    python -m edgediff.benchmarks.export_memory --model sd15 --precision fp16 --optimize-for cuda
    python -m edgediff.benchmarks.export_memory --model sd21 --precision fp16 fp32 int8
    python -m edgediff.benchmarks.export_memory --model sdxl --precision fp32 --for-bench
    python -m edgediff.benchmarks.export_memory --model sd15 --precision int4 --keep --work DIR

The model is built once with random weights (benchmarks.models.ensure_model); each export runs as
its own `edgediff export` process, whose peak RSS is read back from the kernel (wait4's ru_maxrss,
the VmHWM the OOM killer judges) and from the export's own final line. Full-size runs need several
GiB: on a shared machine run this under a lock, e.g. `flock LOCKFILE python -m ...`.
``--for-bench`` writes each export where `edgediff bench` looks for it (beside the built model) and
keeps it, so a full-size model is exported once for both measurements.
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

from .models import default_cache, ensure_model, export_folder

GIB = 1024**3


def export_once(source: Path, out: Path, precision: str, target: str | None, log_file: Path,
                probe: bool = False) -> dict:
    runner = ["edgediff.benchmarks.export_probe"] if probe else ["edgediff", "export"]
    command = [sys.executable, "-m", *runner, str(source), str(out), "--precision", precision,
               "--overwrite", *(["--optimize-for", target] if target else [])]
    started = time.perf_counter()
    stages: dict[str, float] = {}  # "[i/n] graph: stage" -> highest VmRSS seen while it was the last line
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while True:
            stage, rss = _last_stage(log_file), _rss_gib(process.pid)
            if stage and rss is not None:
                stages[stage] = max(stages.get(stage, 0.0), rss)
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # usage: the kernel's VmHWM at exit
            if pid:
                break
            time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    lines = log_file.read_text().splitlines()
    validation = [line for line in lines if ": validate " in line or "not validated" in line]
    return {
        "precision": precision, "optimize_for": target or "default", "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
        "stage_rss_gib": {stage: round(rss, 2) for stage, rss in stages.items()},
        "final_line": lines[-1] if lines else "", "validation": validation,
        "command": " ".join(["edgediff", "export", *command[3 if probe else 4:]]),
    }


SAMPLE_S = 0.5


def _rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:  # gone, or not Linux
        return None
    return None


def _last_stage(log_file: Path) -> str | None:
    """The stage the export is in: its last "[i/n] graph: what" line ("loading" before the first),
    refined by the last ``probe`` line after it (export_probe.py)."""
    with open(log_file, "rb") as handle:
        handle.seek(max(0, log_file.stat().st_size - 8192))
        lines = handle.read().decode(errors="replace").splitlines()
    probe = None
    for line in reversed(lines):
        if line.startswith("probe ") and probe is None:
            _, name, when = line.split()[:3]
            probe = name if when == "start" else f"after {name}"
        elif line.startswith("[") and ": " in line:
            stage = (line.split(": validate")[0] + ": validated" if ": validate " in line
                     else line.split(" in ")[0])[:80]
            return f"{stage.split(': ')[0]}: {probe}" if probe else stage
        elif line.startswith("loading"):
            return f"loading: {probe}" if probe else "loading"
    return None


def default_target(precision: str) -> str:
    from edgediff.exporter.export import default_target as target

    return target(precision)


def _sizes(out: Path) -> dict[str, float]:
    """MB per exported file, as the export left it (before --keep decides its fate)."""
    return {str(f.relative_to(out)): round(f.stat().st_size / 1e6, 1) for f in sorted(out.rglob("*"))
            if f.is_file() and f.stat().st_size > 1e6} if out.is_dir() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="sd15, sd21 or a diffusers config folder")
    parser.add_argument("--precision", nargs="+", default=["fp16", "fp32", "int8"],
                        help="each as `edgediff export --precision` takes it")
    parser.add_argument("--optimize-for", default=None, help="target for every precision [default: the export's]")
    parser.add_argument("--cache", type=Path, default=None, help="built models [default: ~/.cache/edgediff/bench]")
    parser.add_argument("--work", type=Path, default=None, help="where exports are written, then deleted")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per export here")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    parser.add_argument("--probe", action="store_true",
                        help="book RSS to each fusion/write/validation call too (runs export_probe)")
    parser.add_argument("--for-bench", action="store_true",
                        help="export into the bench's cache beside the built model and keep it there")
    args = parser.parse_args(argv)

    source = ensure_model(args.model, args.cache or default_cache())
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=args.work))
    print(f"model {args.model} ({source}); cpu {platform.processor() or platform.machine()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    failed = False
    for precision in args.precision:
        out = (export_folder(source, precision, args.optimize_for or default_target(precision)) if args.for_bench
               else work / f"{args.model}-{precision}")
        result = export_once(source, out, precision, args.optimize_for, work / f"{precision}.log", args.probe)
        result.update(model=args.model, load_average=[round(x, 2) for x in os.getloadavg()], files=_sizes(out))
        for line in result["validation"]:
            print(f"  {line}")
        for stage, rss in result["stage_rss_gib"].items():
            print(f"  RSS {rss:5.2f} GiB  {stage}")
        print(f"{args.model} {precision:5s} {result['optimize_for']:7s} exit {result['exit_code']}  "
              f"wall {result['wall_s']:7.1f} s  peak RSS {result['peak_rss_gib']:5.2f} GiB  | {result['final_line']}",
              flush=True)
        if result["exit_code"] != 0:
            failed = True
            print("\n".join((work / f"{precision}.log").read_text().splitlines()[-5:]), flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        if not (args.keep or args.for_bench):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
