"""Peak memory and time of one VAE decode, tiled vs whole, each in a fresh process.

    python -m edgediff.benchmarks.vae_tiling [--model sd15] [--size 1024] [--export DIR] [--repeat 1]

The model is the full-size architecture with random weights, built and exported fp32 for the CPU
once (``benchmarks/models.py``; reused from the cache) unless ``--export`` names a folder. Each case
loads the pipeline (``memory="low"``: no session before the decode), decodes one random latent
(1, C, size/f, size/f) with ``Pipeline.decode(vae_tiling=...)`` and reads the process's peak resident
memory (VmHWM, Linux) before and after, next to the decoder stage's estimate (``runtime/memory.py``).
The two outputs are compared (mean and max |tiled - whole|, pixels in [0, 1]). Run it under the
shared memory lock: a whole 1024x1024 decode takes several GB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgediff.runtime.memory import GB, _status_kb


def child(export: str, size: int, tiled: bool, out: str) -> dict:
    from edgediff.runtime import Pipeline
    from edgediff.runtime import memory as mem

    pipe = Pipeline.load(export, provider="cpu", memory="low")
    m = pipe.manifest
    f = m.vae_scale_factor
    latent = np.random.default_rng(0).standard_normal((1, m.latent_channels, size // f, size // f), dtype=np.float32)
    side = min(size, m.vae_tiling["tile_pixels"]) if tiled else size
    pipe.estimate_memory(1, size, size)  # reads the graph profiles
    estimate = mem.estimate(pipe._profiles, [("vae_decoder", 1, side // f, side // f)], "low", set(),
                            mem.resident_bytes(), 77)
    before = _status_kb("VmHWM") * 1024
    started = time.perf_counter()
    _, pixels = pipe.decode(latent, vae_tiling=tiled)
    seconds = time.perf_counter() - started
    np.save(out, pixels)
    return {"tiled": tiled, "size": size, "seconds": seconds, "hwm_before_gb": before / GB,
            "peak_gb": _status_kb("VmHWM") * 1024 / GB, "estimate_gb": estimate.peak_bytes / GB,
            "load_s": pipe.sessions.load_seconds.get("vae_decoder", 0.0)}


def _export(args) -> str:
    if args.export:
        return args.export
    from .models import default_cache, ensure_export, ensure_model

    return str(ensure_export(ensure_model(args.model, default_cache()), "fp32", "cpu"))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--export", default=None, help="an exported model folder (default: build/cached)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per case")
    parser.add_argument("--child", choices=("tiled", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.export, args.size, args.child == "tiled", args.out)))
        return
    export = _export(args)
    with open("/proc/loadavg") as load:
        print(f"# CPU: {_cpu()}; load average {load.read().split()[0]}; {args.size}x{args.size}, fp32, provider cpu")
    pixels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for case in ("whole", "tiled"):
                out = str(Path(tmp) / f"{case}.npy")
                proc = subprocess.run([sys.executable, "-m", "edgediff.benchmarks.vae_tiling", "--child", case,
                                       "--export", export, "--size", str(args.size), "--out", out],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(f"{case}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                pixels[case] = np.load(out)
                print(f"{case}: decode {row['seconds'] - row['load_s']:.1f} s (session creation {row['load_s']:.1f} s apart), peak RSS "
                      f"{row['peak_gb']:.2f} GB (before the decode {row['hwm_before_gb']:.2f} GB), "
                      f"decoder-stage estimate {row['estimate_gb']:.2f} GB", flush=True)
    if len(pixels) == 2:
        diff = np.abs(pixels["tiled"] - pixels["whole"])
        print(f"tiled vs whole: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")


if __name__ == "__main__":
    main()
