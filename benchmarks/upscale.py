"""The x4 upscaler, full size (random weights from models/configs/x4-upscaler): export peak RSS, then
128->512 and 512->2048 upscales with edgediff and with diffusers' StableDiffusionUpscalePipeline,
each in a fresh process (time, peak RSS = VmHWM).

    python -m edgediff.benchmarks.upscale --steps 2 --out upscale.jsonl
    python -m edgediff.benchmarks.upscale --only edgediff:512 --steps 1
    python -m edgediff.benchmarks.upscale --estimate --sizes 128,512   # the memory plan only

Full-size runs need several GiB: run under a lock on a shared machine. diffusers runs under an
address-space limit (``--diffusers-limit-gib``, RLIMIT_AS) so an allocation it cannot make fails in
its own process (recorded with the size it asked for) instead of waking the OOM killer.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .hardware import peak_rss_bytes
from .models import default_cache, ensure_model, export_folder

GIB = 1024**3
CONFIG = Path(__file__).resolve().parent.parent / "models" / "configs" / "x4-upscaler"
PROMPT = "a photo of a cat"


def picture(side: int):
    """A smooth random picture (the upscaler's input), the same for both runners."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.BICUBIC)


def run_edgediff(export: Path, side: int, steps: int, guidance: float) -> dict:
    from edgediff.runtime import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(export, provider="cpu", memory="low")
    result = pipe(PROMPT, image=picture(side), steps=steps, guidance=guidance, sampler="ddim", seed=0)
    return {"seconds": time.perf_counter() - started, "timings": {k: round(v, 2) for k, v in result.timings.items()},
            "output": list(result.images[0].size), "estimate_gib": round(pipe.memory_plan.peak_bytes / GIB, 2)
            if pipe.memory_plan else None, "unet_tile": pipe.manifest.upscale["tile_latent"]}


def run_diffusers(folder: Path, side: int, steps: int, guidance: float) -> dict:
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    started = time.perf_counter()
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    try:
        with torch.no_grad():
            image = pipe(PROMPT, image=picture(side), num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(0)).images[0]
    except (RuntimeError, MemoryError) as error:  # the address-space limit: one allocation too large
        asked = re.search(r"allocate (\d+) bytes", str(error))
        return {"refused": str(error).splitlines()[0][:200], "asked_gib": round(int(asked.group(1)) / GIB, 1)
                if asked else None, "seconds": time.perf_counter() - started}
    return {"seconds": time.perf_counter() - started, "load_seconds": round(loaded - started, 2),
            "output": list(image.size)}


def estimates(export: Path, sides: list[int], guidance: float) -> list[dict]:
    """The memory plan's peak (memory="low") per input side: as edgediff runs it (U-Net in tiles, VAE in
    tiles where automatic), and untiled (the U-Net on the whole latent, the VAE decoding whole), which
    is what an untiled pipeline such as diffusers' must hold at least."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime import memory

    pipe = Pipeline.load(export, provider="cpu", memory="low")
    m, graphs = pipe.manifest, [("text_encoder", "text"), ("unet", "latent"), ("vae_decoder", "decode")]
    rows = []
    for side in sides:
        out = side * m.vae_scale_factor
        for label, tile, vae in (("edgediff (tiled)", m.upscale["tile_latent"], None), ("untiled", None, False)):
            vae = memory.tiling(m, vae, out, out)
            plan = pipe.planner.estimate(memory.Shape(1, out, out, guidance > 1, graphs, vae, latent_tile=tile), set())
            rows.append({"estimate": label, "input": side, "output_side": out, "peak_gib": round(plan.peak_bytes / GIB, 2),
                         "stage": plan.stage, "what": plan.what})
    return rows


def worker(args) -> None:
    if args.runner == "export":
        from edgediff.exporter.export import export_model

        started = time.perf_counter()
        export_model(str(args.folder), args.export, precision="fp32", optimize_for="cpu", overwrite=True)
        row = {"seconds": time.perf_counter() - started}
    elif args.runner == "edgediff":
        row = run_edgediff(args.export, args.side, args.steps, args.guidance)
    else:
        row = run_diffusers(args.folder, args.side, args.steps, args.guidance)
    row["peak_rss_gib"] = round(peak_rss_bytes() / GIB, 2)
    print("RESULT " + json.dumps(row), flush=True)


def measure(runner: str, side: int, folder: Path, export: Path, args) -> dict:
    """One fresh process; its row, or how it ended."""
    command = [sys.executable, "-m", "edgediff.benchmarks.upscale", "--worker", runner, "--side", str(side),
               "--folder", str(folder), "--export", str(export), "--steps", str(args.steps),
               "--guidance", str(args.guidance)]
    # never more than the machine has free: the limit must fail the allocation, not wake the OOM killer
    limit = int(min(args.diffusers_limit_gib * GIB, _available() - GIB)) if runner == "diffusers" else None

    def limit_memory():
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_memory, timeout=args.timeout)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[-1][7:]) if found else {"failed": f"exit {done.returncode}",
                                                       "stderr": done.stderr.strip().splitlines()[-3:]}
    except subprocess.TimeoutExpired:
        row = {"failed": f"stopped after {args.timeout} s (--timeout)"}
    if limit:
        row["address_space_limit_gib"] = round(limit / GIB, 1)
    return {"runner": runner, "input": side, "output_side": side * 4, "steps": args.steps,
            "guidance": args.guidance, "loadavg": Path("/proc/loadavg").read_text().split()[:3], **row}


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--sizes", default="128,512", help="input sides (output: 4x)")
    parser.add_argument("--only", nargs="*", default=None, help="runner:side pairs, e.g. edgediff:512 diffusers:128")
    parser.add_argument("--diffusers-limit-gib", type=float, default=14.0)
    parser.add_argument("--estimate", action="store_true", help="print the memory plan's peaks; run nothing")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per measurement")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per measurement")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.runner = args.worker
        return worker(args)
    folder = ensure_model(str(CONFIG), args.cache)
    export = export_folder(folder, "fp32", "cpu")
    if args.estimate:
        for row in estimates(export, [int(side) for side in args.sizes.split(",")], args.guidance):
            print(json.dumps(row), flush=True)
        return
    plan = [("export", 0)] if not (export / "manifest.json").is_file() else []
    sides = [int(s) for s in args.sizes.split(",")]
    plan += [(runner, side) for side in sides for runner in ("edgediff", "diffusers")]
    if args.only is not None:
        wanted = {tuple(item.split(":")) for item in args.only}
        plan = [(r, s) for r, s in plan if r == "export" or (r, str(s)) in wanted or (r, "0") in wanted]
    for runner, side in plan:
        row = measure(runner, side, folder, export, args)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
