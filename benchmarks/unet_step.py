"""U-Net step time of exported models, paired: one call each, in turn, round after round.

    python -m edgediff.benchmarks.unet_step EXPORT_A EXPORT_B --size 256 --batch 2 --rounds 5

Each folder's U-Net is loaded as the runtime loads it (one CPU session, the runtime's thread
count), fed the same random inputs (shapes from its manifest; batch 2 is one classifier-free
guidance step), run once to warm up, then timed alternately with the others so that load from
other jobs falls on all of them alike. Prints session load time, the graph's size on disk, the
resident memory the session added, and the median and best step per model.
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
    axes = {"batch": batch, "latent_height": latent, "latent_width": latent,
            "context": manifest.tokenizer["max_length"]}
    feed = {}
    for spec in entry.inputs:
        shape = [axes[a] if isinstance(a, str) else a for a in spec.shape]
        if spec.name == "timestep":
            feed[spec.name] = np.full(shape, 500.0, np.float32)
        elif spec.name == "time_ids":
            feed[spec.name] = np.tile(np.array([size, size, 0, 0, size, size], np.float32)[: shape[1]], (batch, 1))
        else:
            feed[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="exported model folders")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="2: one classifier-free guidance step")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from edgediff.runtime.manifest import MANIFEST_NAME, Manifest
    from edgediff.runtime.sessions import GraphSession, default_threads

    print(f"cpu {platform.processor() or platform.machine()}; threads {default_threads()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    sessions, feeds, times = [], [], []
    for folder in args.models:
        manifest = Manifest.from_dict(json.loads((folder / MANIFEST_NAME).read_text()))  # U-Net-only exports too
        entry = manifest.graphs["unet"]
        before, started = _rss(), time.perf_counter()
        session = GraphSession("unet", folder, entry, "cpu", manifest.optimized_for, warn=print, cache=False)
        loaded = time.perf_counter() - started
        feed = feed_for(manifest, entry, args.size, args.batch, np.random.default_rng(0))
        session.run(**feed)  # warm-up: first-run allocations
        megabytes = sum(p.stat().st_size for p in (folder / entry.path).parent.glob("model.onnx*")) / 1e6
        print(f"{folder.name}: {entry.precision}, {megabytes:.0f} MB on disk, session {loaded:.1f} s, "
              f"+{(_rss() - before) / 1024**3:.2f} GiB resident", flush=True)
        sessions.append(session)
        feeds.append(feed)
        times.append([])
    for _ in range(args.rounds):
        for session, feed, record in zip(sessions, feeds, times):
            started = time.perf_counter()
            session.run(**feed)
            record.append(time.perf_counter() - started)
    for folder, record in zip(args.models, times):
        print(f"{folder.name}: {args.size}x{args.size} batch {args.batch} step median {statistics.median(record):.3f} s, "
              f"best {min(record):.3f} s ({args.rounds} rounds)", flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
