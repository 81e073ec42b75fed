"""Peak RSS of one generation, and which stage holds it: the CPU stand-in for GPU memory.

    python -m edgediff.benchmarks.generation_memory MODEL_DIR --size 1024 --steps 1 --memory low

Runs in its own process (so the peak is this generation's, loading included). A thread samples
VmRSS every few milliseconds and books each sample to the graph whose session is in use at that
moment (or "between stages"); the process peak (VmHWM) is read at the end. The peak does not depend
on the step count: every step runs the same U-Net calls, so 1-2 steps measure what 20 would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

GIB = 1024**3
SAMPLE_S = 0.005


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(model_dir: str, size: int, steps: int, memory: str, provider: str, vae_tiling: bool | None, t5: str | None = None) -> dict:
    from edgediff.runtime import Pipeline
    from edgediff.runtime.sessions import Sessions

    current = ["loading"]
    per_stage: dict[str, float] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = _status_kib("VmRSS") * 1024 / GIB
            per_stage[current[0]] = max(per_stage.get(current[0], 0.0), rss)
            time.sleep(SAMPLE_S)

    original = Sessions.use

    @contextmanager
    def use(self, name, **options):
        current[0] = name
        try:
            with original(self, name, **options) as session:
                yield session
        finally:
            current[0] = "between stages"

    Sessions.use = use
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:  # a caller in the same process (a test) gets the real Sessions.use back
        pipe = Pipeline.load(model_dir, provider=provider, memory=memory)
        extra = {} if vae_tiling is None else {"vae_tiling": vae_tiling}
        if t5 is not None:  # SD3: T5 on (its graph runs) or off (zeros in its place)
            extra["t5"] = t5
        result = pipe("a photograph of an astronaut riding a horse", "", steps=steps, guidance=7.5, seed=0,
                      width=size, height=size, **extra)
    finally:
        Sessions.use = original
        done.set()
        thread.join()
    wall = time.perf_counter() - started
    return {"model_dir": model_dir, "size": size, "steps": steps, "memory": memory, "provider": provider,
            "vae_tiling": vae_tiling, "t5": t5, "wall_s": round(wall, 1),
            "peak_rss_gib": round(_status_kib("VmHWM") * 1024 / GIB, 3),
            "stage_peak_rss_gib": {k: round(v, 3) for k, v in per_stage.items()},
            "timings": {k: round(v, 2) for k, v in dict(result.timings).items()},
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--memory", default="low", choices=["low", "high"])
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--t5", default=None, choices=["on", "off"], help="SD3: run T5 or feed zeros")
    parser.add_argument("--vae-tiling", default=None, choices=["on", "off"],
                        help="force tiled VAE decoding on or off [default: the pipeline's automatic choice]")
    parser.add_argument("--available-gib", type=float, default=None,
                        help="plan as a machine with this much free memory would (a 6 GiB laptop): the memory "
                             "check's view only; the peak is measured as it runs here")
    args = parser.parse_args(argv)
    tiling = None if args.vae_tiling is None else args.vae_tiling == "on"
    if args.available_gib is not None:
        from edgediff.runtime import memory

        free = int(args.available_gib * GIB)
        memory.available_bytes = lambda: (free, f"--available-gib {args.available_gib}")
    print(json.dumps(measure(args.model_dir, args.size, args.steps, args.memory, args.provider, tiling, t5=args.t5),
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
