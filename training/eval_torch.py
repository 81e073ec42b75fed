"""Semantic accuracy of a trained diffusers pipeline over edgediff.models.shapes.evaluation_grid().

    python training/eval_torch.py $EDGEDIFF_TRAIN_WORK/default-diffusers [--steps 20] [--guidance 7.5]

Runs the torch/diffusers pipeline (DPMSolverMultistepScheduler, 128x128) on every grid prompt with
its seed (torch.Generator seeded per entry), reads each image back with shapes.evaluate and prints
per-attribute accuracy. --save DIR writes the images (and a contact sheet) for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_vae import shapes  # noqa: E402  (same import fallback as the training script)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--save", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    grid = shapes.evaluation_grid()
    if args.limit:
        grid = grid[: args.limit]
    t0 = time.time()
    results, images = [], []
    for i in range(0, len(grid), args.batch):
        chunk = grid[i:i + args.batch]
        gens = [torch.Generator().manual_seed(e["seed"]) for e in chunk]
        out = pipe([e["prompt"] for e in chunk], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   height=128, width=128, generator=gens)
        for e, im in zip(chunk, out.images):
            pred = shapes.evaluate(im)
            s = shapes.score(pred, e["expected"])
            results.append(s)
            images.append(im)
            if not all(s.values()):
                wrong = {k: pred[k] for k, ok in s.items() if not ok}
                print(f"  miss: {e['prompt']!r} seed {e['seed']}: got {wrong}")
    acc = shapes.summarize(results)
    print(f"{len(grid)} images, {args.steps} steps, guidance {args.guidance}, {time.time() - t0:.1f}s")
    print(json.dumps({k: round(v, 4) for k, v in acc.items()}))
    print("| " + " | ".join(acc) + " |")
    print("|" + "---|" * len(acc))
    print("| " + " | ".join(f"{100 * v:.1f}%" for v in acc.values()) + " |")
    if args.save:
        from PIL import Image

        os.makedirs(args.save, exist_ok=True)
        for j, im in enumerate(images):
            im.save(os.path.join(args.save, f"{j:03d}.png"))
        cols = 12
        rows = (len(images) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * 128, rows * 128), (60, 60, 60))
        for j, im in enumerate(images):
            sheet.paste(im, ((j % cols) * 128, (j // cols) * 128))
        sheet.save(os.path.join(args.save, "sheet.png"))
    return acc


if __name__ == "__main__":
    main()
