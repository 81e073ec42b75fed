"""The shipped default model, measured through the torch-free runtime.

    python -m edgediff.benchmarks.default_model [--model DIR] [--steps 20] [--guidance 7.5]

Semantic accuracy: every prompt of ``edgediff.models.shapes.evaluation_grid()`` is generated with
its seed and read back by the deterministic evaluator. Speed: a 20-step generation at the model's
native size, end to end (text encoder, sampler loop, VAE decode), median of several runs with
resident sessions, plus one cold run that includes creating the sessions (what the CLI pays).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from edgediff.models import shapes
from edgediff.runtime import Pipeline

TARGETS = {"color": 0.90, "shape": 0.80, "background": 0.90, "position": 0.80}


def accuracy(pipe: Pipeline, *, steps: int, guidance: float, sampler: str) -> tuple[dict, list[dict]]:
    grid = shapes.evaluation_grid()
    scores, rows = [], []
    for index, entry in enumerate(grid, 1):
        result = pipe(entry["prompt"], steps=steps, guidance=guidance, sampler=sampler, seed=entry["seed"])
        predicted = shapes.evaluate(result.images[0])
        scores.append(shapes.score(predicted, entry["expected"]))
        rows.append({**entry, "predicted": predicted})
        print(f"\raccuracy: {index}/{len(grid)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return shapes.summarize(scores), rows


def speed(model_dir, *, provider: str, steps: int, sampler: str, repeats: int = 5) -> dict:
    cold_started = time.perf_counter()
    cold = Pipeline.load(model_dir, provider=provider, memory="low")
    cold("a red circle on a white background", steps=steps, sampler=sampler, seed=0)
    cold_seconds = time.perf_counter() - cold_started
    warm = Pipeline.load(model_dir, provider=provider, memory="high")
    warm("warm up", steps=steps, sampler=sampler, seed=0)
    runs = [warm("a red circle on a white background", steps=steps, sampler=sampler, seed=s).timings
            for s in range(repeats)]
    return {
        "cold_seconds": cold_seconds,
        "total_median": statistics.median(r["total"] for r in runs),
        "unet_per_step_median": statistics.median(r["unet_per_step"] for r in runs),
        "text_encoder_median": statistics.median(r["text_encoder"] for r in runs),
        "vae_decoder_median": statistics.median(r["vae_decoder"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder [default: the shipped default model]")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", default="dpmpp_2m_karras")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)

    pipe = Pipeline.load(args.model, provider=args.provider, memory="high")
    size = pipe.manifest.default_size
    print(f"model {pipe.model_dir} ({pipe.manifest.precision}), {size}x{size}, {args.steps} steps, "
          f"{args.sampler}, guidance {args.guidance}, provider {pipe.provider}")
    timing = speed(pipe.model_dir, provider=args.provider, steps=args.steps, sampler=args.sampler)
    print("\n| end to end (median of 5, sessions resident) | U-Net step | text encoder | VAE decode | cold run incl. session creation |")
    print("|---|---|---|---|---|")
    print(f"| {timing['total_median']:.3f} s | {timing['unet_per_step_median'] * 1000:.1f} ms | "
          f"{timing['text_encoder_median'] * 1000:.1f} ms | {timing['vae_decoder_median'] * 1000:.1f} ms | "
          f"{timing['cold_seconds']:.3f} s |")
    if args.skip_accuracy:
        return 0
    summary, rows = accuracy(pipe, steps=args.steps, guidance=args.guidance, sampler=args.sampler)
    print(f"\nsemantic accuracy over {len(rows)} grid entries (evaluator: edgediff.models.shapes.evaluate)\n")
    print("| attribute | accuracy | target | met |")
    print("|---|---|---|---|")
    for attribute, value in summary.items():
        target = TARGETS.get(attribute)
        verdict = "" if target is None else ("yes" if value >= target else "NO")
        print(f"| {attribute} | {value:.1%} | {'' if target is None else f'{target:.0%}'} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
