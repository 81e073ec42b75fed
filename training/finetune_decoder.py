"""Fine-tune only the VAE decoder of a trained default model (like SD's ft-MSE VAE decoders).

The encoder, its quant_conv and scaling_factor stay frozen, so the latent space the U-Net was
trained on does not change: this can run before, during or after U-Net training.

    nice -n 10 python training/finetune_decoder.py $EDGEDIFF_TRAIN_WORK/vae --minutes 8 [--pipeline DIR]

--pipeline DIR also replaces DIR/vae (a diffusers pipeline folder) with the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_vae import WORK, foreground_weight, log, to_tensor  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("vae")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set (train_vae.py --seed)")
    p.add_argument("--rng-seed", type=int, default=11, help="batch sampling seed")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--work", default=WORK)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--fg-weight", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pipeline", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    t0 = time.time()
    d = np.load(os.path.join(args.work, f"data_seed{args.seed}_n{args.n}.npz"))
    import json

    images, attrs = d["images"], json.loads(str(d["attrs"]))
    vae = AutoencoderKL.from_pretrained(args.vae)
    for m in (vae.encoder, vae.quant_conv):
        m.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + args.rng_seed)
    step, run = 0, None
    t_start = time.time()
    while (frac := (time.time() - t_start) / (60 * args.minutes)) < 1.0:
        step += 1
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 20) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        idx = rng.integers(0, len(images), args.batch)
        x = to_tensor(images[idx])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = vae.decode(z).sample
        err = (rec.float() - x).abs()
        w = foreground_weight(images, attrs, idx, args.fg_weight)
        loss = ((err + err.pow(2)) * w).sum() / (w.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run = err.mean().item() if run is None else 0.98 * run + 0.02 * err.mean().item()
        if step % 50 == 0 or step == 1:
            log(f"decoder step {step} ({100 * frac:.0f}%) l1 {run:.4f}", t0)
    vae.save_pretrained(args.vae)
    log(f"decoder: {step} steps, saved {args.vae}", t0)
    if args.pipeline:
        dst = os.path.join(args.pipeline, "vae")
        shutil.rmtree(dst, ignore_errors=True)
        vae.save_pretrained(dst)
        log(f"replaced {dst}", t0)


if __name__ == "__main__":
    main()
