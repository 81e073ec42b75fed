"""The memory estimate a generation is checked against, next to the peak it really reaches.

    python -m edgediff.benchmarks.memory_estimate --model DIR [--size 512 --size 1024]
        [--memory low] [--guidance 7.5] [--steps 1] [--refuse 8192]

Each size runs in a fresh process: load the model, generate ``--steps`` steps with the pre-flight
check on (it compares the estimate with MemAvailable and decides whether a graph with a huge score
matrix runs without ONNX Runtime's arena), then print the plan it accepted
(``Pipeline.memory_plan``) next to the process's peak resident memory (VmHWM, Linux). ``--refuse SIZE`` asks for a
SIZExSIZE image with the check on and prints the one-line refusal (nothing is run). Run big models
under the shared memory lock; ``--limit-gb`` caps each child's address space so that a wrong
estimate ends in an allocation error instead of the OOM killer.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

from edgediff.runtime import EdgediffError, Pipeline
from edgediff.runtime.memory import GB, _status_kb


def child(model: str, size: int, memory: str, guidance: float, steps: int) -> dict:
    pipe = Pipeline.load(model, provider="cpu", memory=memory)
    pipe("a corgi on a beach", steps=steps, guidance=guidance, seed=0, width=size, height=size)
    estimate = pipe.memory_plan
    return {"size": size, "memory": memory, "guidance": guidance, "estimate_gb": estimate.peak_bytes / GB,
            "peak": str(estimate), "without_arena": sorted(estimate.without_arena),
            "measured_gb": _status_kb("VmHWM") * 1024 / GB}


def run_child(args, size: int) -> dict:
    command = [sys.executable, "-m", "edgediff.benchmarks.memory_estimate", "--child", "--model", args.model,
               "--size", str(size), "--memory", args.memory, "--guidance", str(args.guidance),
               "--steps", str(args.steps)]
    limit = ["prlimit", f"--as={int(args.limit_gb * GB)}"] if args.limit_gb else []
    proc = subprocess.run(limit + command, capture_output=True, text=True)
    if proc.returncode:
        return {"size": size, "memory": args.memory, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, action="append")
    parser.add_argument("--memory", choices=("low", "high"), default="low")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--refuse", type=int, default=None)
    parser.add_argument("--limit-gb", type=float, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.size[0], args.memory, args.guidance, args.steps)))
        return
    print(f"# CPU: {_cpu()}, {args.memory} memory, guidance {args.guidance}, "
          f"{args.steps} step(s)")
    if args.refuse:
        pipe = Pipeline.load(args.model, provider="cpu", memory=args.memory)
        try:
            pipe("a corgi", steps=1, guidance=args.guidance, width=args.refuse, height=args.refuse)
            print(f"{args.refuse}x{args.refuse}: NOT refused")
        except EdgediffError as error:
            print(f"{args.refuse}x{args.refuse}: error: {error}")
    for size in args.size or []:
        row = run_child(args, size)
        if "error" in row:
            print(f"{size}x{size}: failed: {row['error']}")
            continue
        ratio = row["estimate_gb"] / row["measured_gb"]
        print(f"{size}x{size} {args.memory}: estimate {row['estimate_gb']:.2f} GB, measured peak RSS "
              f"{row['measured_gb']:.2f} GB, estimate/measured {ratio:.2f} ({row['peak']}; without the CPU "
              f"arena: {', '.join(row['without_arena']) or 'none'})", flush=True)


if __name__ == "__main__":
    main()
