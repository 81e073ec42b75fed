"""Batch throughput: a plain Python loop over Pipeline calls, `edgediff batch` in-process, and
`edgediff batch` on a local Ray cluster with 1 and 2 actors (the machine's cores shared out).
The plain loop runs with ONNX Runtime's default threads (one per core) and with one thread, the
share a one-CPU actor gets.

    python -m edgediff.benchmarks.batch_throughput [--jobs 24] [--steps 8] [--size 128] [--rounds 2]

Uses the shipped default model on the CPU provider. The variants run back to back, `--rounds`
times in turn, so a shared machine's changing load hits them alike; the load average is printed
beside each figure. Two numbers per run: images/s over the whole run (pipeline load or actor
start included) and steady-state images/s (from the first finished image to the last).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time

from edgediff.batch import run_batch
from edgediff.runtime import Pipeline


def jobs(count: int, steps: int, size: int) -> list[dict]:
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    return [{"prompt": f"a {colours[n % 4]} {shapes[n % 3]} on a white background", "seed": n, "steps": steps,
             "width": size, "height": size} for n in range(count)]


def plain_loop(batch: list[dict], threads: int | None) -> dict:
    started = time.perf_counter()
    pipe = Pipeline.load(None, provider="cpu", memory="high", threads=threads)
    done = []
    for job in batch:
        params = dict(job)
        image = pipe(params.pop("prompt"), **params).images[0]
        image.save(io.BytesIO(), format="PNG")
        done.append(time.perf_counter())
    return _figures(started, done)


def batch_run(batch: list[dict], ray: str | None, workers: int | None, cpus: float) -> dict:
    out = tempfile.mkdtemp(prefix="edgediff-batch-bench-")
    done, errors = [], []

    def on_result(entry):
        done.append(time.perf_counter())
        if entry["error"]:
            errors.append(entry["error"])

    try:
        started = time.perf_counter()
        summary = run_batch(batch, out, provider="cpu", ray=ray, workers=workers, cpus_per_worker=cpus,
                            progress=False, on_result=on_result)
        if summary.failed:
            raise SystemExit(f"{summary.line()}; first error: {errors[0]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return _figures(started, done)


def _figures(started: float, done: list[float]) -> dict:
    whole = len(done) / (done[-1] - started)
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else float("nan")
    return {"images_per_s": whole, "steady_images_per_s": steady, "seconds": done[-1] - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    batch = jobs(args.jobs, args.steps, args.size)

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's memory monitor kills workers when the whole machine's memory is nearly full, which on a
    # shared machine is other people's doing; these workers take a few hundred MB each.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    temp = tempfile.mkdtemp(prefix="ray")
    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=temp, logging_level="WARNING",
             object_store_memory=100 * 2**20)
    ray_start = time.perf_counter() - started
    variants = {
        f"plain loop (Pipeline calls), {cores} threads": lambda: plain_loop(batch, None),
        "plain loop (Pipeline calls), 1 thread": lambda: plain_loop(batch, 1),
        "edgediff batch, no Ray": lambda: batch_run(batch, None, None, 1),
        f"edgediff batch --ray, 1 actor x {cores} CPUs": lambda: batch_run(batch, "", 1, cores),
        f"edgediff batch --ray, {cores} actors x 1 CPU": lambda: batch_run(batch, "", cores, 1),
    }
    rows = []
    try:
        for round_number in range(args.rounds):
            for name, measure in variants.items():
                load_before = os.getloadavg()[0]
                figures = measure()
                rows.append((round_number + 1, name, figures, load_before, os.getloadavg()[0]))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    print(f"{_cpu_name()}, {cores} cores; {args.jobs} jobs, "
          f"{args.size}x{args.size}, {args.steps} steps, dpmpp_2m_karras, guidance 7.5; "
          f"Ray local cluster start {ray_start:.1f} s (not counted)\n")
    print("| round | variant | images/s (whole run) | images/s (steady) | seconds | load avg before/after |")
    print("|---|---|---|---|---|---|")
    for round_number, name, f, before, after in rows:
        print(f"| {round_number} | {name} | {f['images_per_s']:.2f} | {f['steady_images_per_s']:.2f} | "
              f"{f['seconds']:.1f} | {before:.1f} / {after:.1f} |")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
