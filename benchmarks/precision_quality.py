"""Quality cost of the CPU precisions on trained weights: the shipped default model's U-Net quantized
as ``--precision int8`` and ``int4`` quantize it, its images against the fp32 model's.

    python -m edgediff.benchmarks.precision_quality [--model DIR] [--prompts 24] [--steps 20]

Variants (each the shipped model with only its U-Net replaced, the other graphs linked): int8 (dynamic,
MatMul/Attention/Gemm weights), int4 at accuracy_level 0 (weights dequantized, fp32 products) and at 4
(activations quantized to int8 per block, integer products: what ``--precision int4`` writes for the
CPU). The quantizers are the exporter's own (``exporter/optimize.py``). Prints, per variant, PSNR
against the fp32 images (median, min), the largest pixel difference, the evaluator's semantic accuracy
on the same prompts and seeds (``models/shapes.py``), and the time of those generations.
Random weights say nothing here (their outputs drift far under any quantization): this needs a trained
model, and the default model is the one trained model that ships.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {"int8": ("int8", None), "int4-acc0": ("int4", 0), "int4-acc4": ("int4", 4)}


def quantized_unet(model_dir: Path, precision: str, accuracy_level: int | None, out: Path) -> Path:
    """``model_dir`` with its U-Net quantized as the exporter does; every other file linked."""
    import onnx

    from edgediff.exporter import optimize as opt
    from edgediff.runtime.manifest import read_manifest

    unet_path = read_manifest(model_dir).graphs["unet"].path
    for item in model_dir.iterdir():
        if item.name != "session_cache" and item.name != Path(unet_path).parts[0]:
            (out / item.name).symlink_to(item.resolve())
    model = onnx.load(str(model_dir / unet_path))
    if precision == "int8":
        model = opt.quantize_int8(model, model_dir / Path(unet_path).parent)
    else:
        model = opt.gemm_to_matmul(model, out)
        model = opt.quantize_nbits(model, out, 4, 32, accuracy_level)
    (out / unet_path).parent.mkdir(parents=True)
    onnx.save(model, str(out / unet_path))
    return out


def images(model_dir: Path, grid: list[dict], steps: int) -> tuple[list[np.ndarray], float]:
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(model_dir, provider="cpu", memory="high")
    started, out = time.perf_counter(), []
    for entry in grid:
        out.append(pipe(entry["prompt"], steps=steps, seed=entry["seed"]).images[0])
    return out, time.perf_counter() - started


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def compare(reference: list, variant: list, grid: list[dict]) -> dict:
    from edgediff.models import shapes

    scores = [shapes.score(shapes.evaluate(image), entry["expected"]) for image, entry in zip(variant, grid)]
    values = [psnr(np.asarray(a), np.asarray(b)) for a, b in zip(reference, variant)]
    worst = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(reference, variant))
    return {"psnr_median_db": statistics.median(values), "psnr_min_db": min(values),
            "max_pixel_diff": worst, "accuracy": shapes.summarize(scores)}


def main(argv: list[str] | None = None) -> int:
    from edgediff.models import default_model_dir, shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="[default: the shipped model]")
    parser.add_argument("--prompts", type=int, default=24, help="prompts of the evaluation grid, with their seeds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    model_dir = (args.model or default_model_dir()).resolve()
    grid = shapes.evaluation_grid()[: args.prompts]
    reference, seconds = images(model_dir, grid, args.steps)
    fp32_scores = [shapes.score(shapes.evaluate(image), entry["expected"]) for image, entry in zip(reference, grid)]
    rows = {"fp32": {"accuracy": shapes.summarize(fp32_scores), "seconds": seconds}}
    print(f"fp32: {len(grid)} images in {seconds:.1f} s, accuracy {rows['fp32']['accuracy']}", flush=True)
    for name in args.variants.split(","):
        precision, level = VARIANTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            variant, seconds = images(quantized_unet(model_dir, precision, level, Path(tmp)), grid, args.steps)
        rows[name] = {**compare(reference, variant, grid), "seconds": seconds}
        row = rows[name]
        print(f"{name}: PSNR median {row['psnr_median_db']:.1f} dB, min {row['psnr_min_db']:.1f} dB, max pixel diff "
              f"{row['max_pixel_diff']}/255, accuracy {row['accuracy']}, {seconds:.1f} s", flush=True)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
