"""U-Net (or SD3 transformer) step time of exported models, paired: one call each, in turn, round after round.

    python -m edgediff.benchmarks.unet_step EXPORT_A EXPORT_B --size 256 --batch 2 --rounds 5
        [--diffusers DIR [--bf16]] [--threads N] [--gemm] [--arena-off]

Each folder's U-Net is loaded as the runtime loads it (one CPU session, the runtime's thread
count), fed the same random inputs (shapes from its manifest; batch 2 is one classifier-free
guidance step), run once to warm up, then timed alternately with the others so that load from
other jobs falls on all of them alike. Prints session load time, the graph's size on disk, the
resident memory the session added, and the median and best step per model.

``--diffusers DIR`` adds the diffusers U-Net of that folder (fp32, and with ``--bf16`` also under
bf16 autocast) to the same rounds, fed the same inputs. ``--gemm`` measures this machine's fp32
matrix-multiply rate (torch, a 4096-square fp32 GEMM, same threads) and prints each U-Net's
arithmetic rate (FLOPs counted from the first export's graph) against it: how much headroom any fp32
engine has left here. ``--arena-off`` adds each export once more, its session without ONNX
Runtime's CPU memory arena (what the memory check falls back to when the arena would not fit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def feed_for(manifest, entry, size: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the U-Net's declared shapes: a ``size``-pixel square image, one 77-token chunk per row."""
    latent = size // manifest.vae_scale_factor
    axes = {"batch": batch, "latent_height": latent, "latent_width": latent, "context": _context(manifest)}
    feed = {}
    for spec in entry.inputs:
        shape = [axes[a] if isinstance(a, str) else a for a in spec.shape]
        if spec.name == "timestep":
            feed[spec.name] = np.full(shape, 500.0, np.float32)
        elif spec.name == "skip_layers":  # SD3: no block skipped (no skip-layer guidance)
            feed[spec.name] = np.zeros(shape, np.float32)
        elif spec.name == "time_ids":
            feed[spec.name] = np.tile(np.array([size, size, 0, 0, size, size], np.float32)[: shape[1]], (batch, 1))
        else:
            feed[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def _context(manifest) -> int:
    """Tokens the denoiser attends to: one 77-token chunk, or (SD3) each context group's tokens in turn
    (CLIP's 77, then T5's 256, zeros when T5 is off)."""
    groups = ((manifest.conditioning or {}).get("text") or {}).get("context") or [{}]
    return sum(group.get("absent_tokens") or manifest.tokenizer["max_length"] for group in groups)


def _diffusers_denoiser(folder: Path):
    """The diffusers denoiser of a folder in fp32: its U-Net, or (SD3) its transformer."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if (folder / "transformer").is_dir():
        return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32).eval()
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def _diffusers_unet(unet, feed: dict[str, np.ndarray], autocast: bool):
    """A call of the diffusers ``unet`` on ``feed`` (the export's input names), fp32 or bf16 autocast."""
    import torch

    tensors = {name: torch.from_numpy(array) for name, array in feed.items()}
    extra = {k: tensors[k] for k in ("text_embeds", "time_ids") if k in tensors}
    kwargs = {"added_cond_kwargs": extra} if extra else {}
    if "timestep_cond" in tensors:
        kwargs["timestep_cond"] = tensors["timestep_cond"]

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if "pooled_projections" in tensors:  # SD3's transformer: keywords in its own order
                unet(hidden_states=tensors["sample"], timestep=tensors["timestep"], return_dict=False,
                     encoder_hidden_states=tensors["encoder_hidden_states"],
                     pooled_projections=tensors["pooled_projections"])
            else:
                unet(tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"], **kwargs)
    return call


def interleaved_rounds(calls: list, rounds: int) -> list[list[float]]:
    """Seconds of each call per round. A round runs every call back to back, so the ratio of two
    calls within a round sees nearly the same machine load (these machines are shared)."""
    times = [[] for _ in calls]
    for _ in range(rounds):
        for call, record in zip(calls, times):
            started = time.perf_counter()
            call()
            record.append(time.perf_counter() - started)
    return times


def gemm_gflops(threads: int, side: int = 4096, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of torch here (GFLOP/s): the ceiling fp32 convolutions and MatMuls share."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * side ** 3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="exported model folders")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="2: one classifier-free guidance step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--diffusers", type=Path, default=None, help="a diffusers folder to pair with")
    parser.add_argument("--bf16", action="store_true", help="with --diffusers: also under bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine [runtime default]")
    parser.add_argument("--gemm", action="store_true", help="print the fp32 GEMM ceiling and each rate")
    parser.add_argument("--arena-off", action="store_true",
                        help="also time each export without ONNX Runtime's CPU memory arena")
    args = parser.parse_args(argv)

    from edgediff.runtime.manifest import MANIFEST_NAME, Manifest
    from edgediff.runtime.sessions import GraphSession, default_threads

    threads = args.threads or default_threads()
    print(f"cpu {platform.processor() or platform.machine()}; threads {threads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    names, calls = [], []
    for folder in args.models:
        manifest = Manifest.from_dict(json.loads((folder / MANIFEST_NAME).read_text()))  # U-Net-only exports too
        entry = manifest.graphs["unet"]
        before, started = _rss(), time.perf_counter()
        session = GraphSession("unet", folder, entry, "cpu", manifest.optimized_for, warn=print, cache=False,
                               threads=threads)
        loaded = time.perf_counter() - started
        feed = feed_for(manifest, entry, args.size, args.batch, np.random.default_rng(0))
        session.run(**feed)  # warm-up: first-run allocations
        megabytes = sum(p.stat().st_size for p in (folder / entry.path).parent.glob("model.onnx*")) / 1e6
        print(f"{folder.name}: {entry.precision}, {megabytes:.0f} MB on disk, session {loaded:.1f} s, "
              f"+{(_rss() - before) / 1024**3:.2f} GiB resident", flush=True)
        names.append(f"{folder.name} ({entry.precision})")
        calls.append(lambda session=session, feed=feed: session.run(**feed))
        if args.arena_off:
            bare = GraphSession("unet", folder, entry, "cpu", manifest.optimized_for, warn=print, cache=False,
                                threads=threads, arena=False)
            bare.run(**feed)
            names.append(f"{folder.name} ({entry.precision}, no CPU arena)")
            calls.append(lambda session=bare, feed=feed: session.run(**feed))
    if args.diffusers:
        import torch

        torch.set_num_threads(threads)
        unet = _diffusers_denoiser(args.diffusers)  # fp32 weights
        for autocast in (False, True) if args.bf16 else (False,):
            call = _diffusers_unet(unet, feed, autocast)  # the inputs the exports got
            call()  # warm-up
            names.append(f"diffusers {'bf16 autocast' if autocast else 'fp32'}")
            calls.append(call)
    times = interleaved_rounds(calls, args.rounds)
    medians = [statistics.median(record) for record in times]
    for name, record, median in zip(names, times, medians):
        print(f"{name}: {args.size}x{args.size} batch {args.batch} step median {median:.3f} s, "
              f"best {min(record):.3f} s ({args.rounds} rounds)"
              + (f", {median / medians[0]:.2f}x the first" if len(calls) > 1 else ""), flush=True)
    if args.gemm:
        from .flops import unet_step_flops

        latent = args.size // manifest.vae_scale_factor
        gflop = unet_step_flops(args.models[0], args.batch, latent, latent)["total"] / 1e9
        ceiling = gemm_gflops(threads)
        print(f"fp32 GEMM ceiling (torch, 4096^2, {threads} threads): {ceiling:.0f} GFLOP/s; "
              f"U-Net step {gflop:.1f} GFLOP", flush=True)
        for name, median in zip(names, medians):
            rate = gflop / median
            print(f"{name}: {rate:.0f} GFLOP/s, {100 * rate / ceiling:.0f}% of the fp32 GEMM ceiling", flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
