"""Full-size SD 3.5 Medium on this machine: random weights from the shipped config, its exports' peak
memory, a 1024x1024 generation's peak memory, and the transformer step paired with diffusers.

    python -m edgediff.benchmarks.sd35m [--precision int4 fp16] [--size 1024] [--step-size 512]
        [--steps 1] [--t5 off] [--rounds 1] [--only build,export,generate,step]

Each part runs in its own process, one after another, so each peak is its own:
- build: ``models/configs/sd35m`` with seeded random weights, one component at a time; T5-XXL and the
  transformer are built and stored in fp16 (T5 is 19 GB in fp32 and is never held whole in fp32).
- export: ``edgediff export`` per precision (benchmarks.export_memory, peak RSS from wait4), T5
  included; the first is kept in the bench cache for the next parts, the others (run last) are
  deleted once measured.
- generate: one generation with ``memory="low"`` on the first precision's export
  (benchmarks.generation_memory: peak RSS per stage and time), T5 off (zeros) or on.
- step: one classifier-free-guidance transformer step (batch 2) of that export, paired in one process
  with diffusers' transformer in fp32 and under bf16 autocast (benchmarks.unet_step).
Latency does not depend on weight values; accuracy must be judged on trained weights.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .models import default_cache, ensure_model, export_folder

MODEL = "sd35m"
PARTS = ("build", "export", "generate", "step")


def _run(module: str, *args: str) -> int:
    """One part in a fresh process (its own peak RSS), its output passed through."""
    command = [sys.executable, "-m", f"edgediff.benchmarks.{module}", *args]
    print(f"$ {' '.join(command[1:])}  (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["int4", "fp16"], help="exports to measure, in order")
    parser.add_argument("--size", type=int, default=1024, help="generation size in pixels")
    parser.add_argument("--step-size", type=int, default=512, help="image size of the paired transformer step")
    parser.add_argument("--steps", type=int, default=1, help="generation steps (the peak does not depend on them)")
    parser.add_argument("--t5", default="off", choices=["on", "off"], help="T5 in the generation")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the paired step")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--cache", type=Path, default=None, help="[default: ~/.cache/edgediff/bench]")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    cache = args.cache or default_cache()
    source = ensure_model(MODEL, cache)  # build: cached after the first run
    first = export_folder(source, args.precision[0], "cpu" if args.precision[0] != "fp16" else "cuda")
    failed = 0
    cached = ["--cache", str(cache)] if args.cache else []
    if "export" in parts:  # the first export is kept for the next parts; the others are deleted once measured
        failed |= _run("export_memory", "--model", MODEL, "--for-bench", "--precision", args.precision[0], *cached)
    if "generate" in parts:
        failed |= _run("generation_memory", str(first), "--size", str(args.size), "--steps", str(args.steps),
                       "--memory", "low", "--t5", args.t5)
    if "step" in parts:
        failed |= _run("unet_step", str(first), "--diffusers", str(source), "--bf16", "--size", str(args.step_size),
                       "--batch", "2", "--rounds", str(args.rounds))
    if "export" in parts and args.precision[1:]:  # last: exports written and deleted (disk: T5 alone is 19 GB)
        failed |= _run("export_memory", "--model", MODEL, "--precision", *args.precision[1:], *cached)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
