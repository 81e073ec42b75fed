"""Data, VAE and latents of edgediff's shipped default model (the first three phases of its
first training script; the U-Net and text encoder come from train_default_v2.py).

A tiny Stable-Diffusion-architecture autoencoder on the procedural "coloured shapes" data set
(edgediff.models.shapes): diffusers AutoencoderKL, 4 blocks -> 8x downsampling per side,
128x128x3 -> 16x16x4.

Phases (each resumable; outputs under --work, default $EDGEDIFF_TRAIN_WORK or ./checkpoints):
  1. data     render N images + attributes (deterministic from --seed)
  2. vae      train the autoencoder (L1 + MSE + tiny KL, shape pixels weighted up), then set
              scaling_factor = 1 / std(latents)
  3. latents  encode the data set once with the trained VAE (latent means * scaling_factor)
Then training/finetune_decoder.py fine-tunes the decoder alone (the shipped ``vae_ft``).

Machine: the shared 2-core x86 VM (no GPU), torch 2.13.0 CPU, 1 thread per process (2 threads
were ~5x slower while other jobs loaded the cores), nice 10.  VAE ~1 step/s (batch 16, bf16
autocast), encoding the 20k-image data set ~8 min.

TRAINING_LOG (2026-11-22, session for issue 4):
    data      20,000 images, seed 0 (20 s)
    vae       v1: 576 steps / 9 min, plain L1+MSE -> colours wrong on reconstruction (green came
              back blue, 52% colour accuracy through the evaluator);
              v2: +512 steps / 8 min with the foreground-weighted loss (--vae-init v1);
              decoder-only fine-tune (training/finetune_decoder.py) 498 + ~880 steps / 23 min;
              scaling_factor 0.41449.
              Reconstruction through the evaluator (192 images): colour 95.8%, shape 94.3%,
              background/position/size 100%; mean abs error 2.3/255.
    command   nice -n 10 python training/train_vae.py --seed 0 --vae-minutes 8 --vae-lr 1e-3 --vae-init <v1>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

try:
    from edgediff.models import shapes
except ImportError:  # running from a checkout without the editable install
    import importlib.util

    _spec = importlib.util.spec_from_file_location("shapes", os.path.join(REPO, "models", "shapes.py"))
    shapes = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(shapes)

TOKENIZER_DIR = os.path.join(REPO, "models", "clip_tokenizer")
# checkpoints and intermediate data of the training runs
WORK = os.environ.get("EDGEDIFF_TRAIN_WORK", "checkpoints")

# --------------------------------------------------------------------------- architecture

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=128,
    mid_block_add_attention=False,
)

def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:8.1f}s] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- phases


def phase_data(args, t0):
    path = os.path.join(args.work, f"data_seed{args.seed}_n{args.n}.npz")
    if os.path.exists(path):
        d = np.load(path, allow_pickle=False)
        attrs = json.loads(str(d["attrs"]))
        log(f"data: loaded {path}", t0)
        return d["images"], attrs
    images, _, attrs = shapes.make_dataset(args.n, seed=args.seed)
    np.savez(path, images=images, attrs=json.dumps(attrs))
    log(f"data: rendered {args.n} images -> {path}", t0)
    return images, attrs


def foreground_weight(images: np.ndarray, attrs: list, idx: np.ndarray, weight: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + weight * [pixel differs from the known background colour].

    The shape covers 5-20% of an image; without this the plain background dominates the loss and
    a short run learns shapes' colours badly (green came back blue, yellow orange)."""
    bg = np.array([shapes.BACKGROUNDS[attrs[int(i)]["background"]] for i in idx], np.int16)
    diff = np.abs(images[idx].astype(np.int16) - bg[:, None, None, :]).sum(-1)
    return torch.from_numpy(1.0 + weight * (diff > 24).astype(np.float32))[:, None]


def phase_vae(args, images, t0, attrs=None):
    from diffusers import AutoencoderKL

    out = os.path.join(args.work, "vae")
    if os.path.exists(os.path.join(out, "config.json")):
        log("vae: loaded trained VAE", t0)
        return AutoencoderKL.from_pretrained(out)
    torch.manual_seed(args.seed)
    if args.vae_init:
        vae = AutoencoderKL.from_pretrained(args.vae_init)
        log(f"vae: continuing from {args.vae_init}", t0)
    else:
        vae = AutoencoderKL(**VAE_CONFIG)
    log(f"vae: {nparams(vae):,} params; training {args.vae_steps} steps, batch {args.vae_batch}", t0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t_vae = time.time()

    def vae_progress(step):
        return max(step / args.vae_steps, (time.time() - t_vae) / (60 * args.vae_minutes))
    rng = np.random.default_rng(args.seed + 1)
    vae.train()
    run = None
    step = 0
    while vae_progress(step) < 1.0:
        step += 1
        frac = vae_progress(step)
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * min(1.0, step / 30) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        idx = rng.integers(0, len(images), args.vae_batch)
        x = to_tensor(images[idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.vae_fp32):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
        rec = rec.float()
        kl = post.kl().mean() / (16 * 16 * 4)
        w = foreground_weight(images, attrs, idx, args.vae_fg_weight)
        err = (rec - x).abs()
        l1 = err.mean()
        loss = ((err + err.pow(2)) * w).sum() / (w.sum() * 3) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run = l1.item() if run is None else 0.98 * run + 0.02 * l1.item()
        if step % 50 == 0 or step == 1:
            log(f"vae step {step} ({100 * frac:.0f}%) l1 {run:.4f} kl {kl.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e}", t0)
    log(f"vae: trained {step} steps in {(time.time() - t_vae) / 60:.1f} min", t0)
    vae.eval()
    # scaling factor = 1 / std of the latents (SD's convention), measured on latent means
    with torch.no_grad():
        zs = torch.cat([vae.encode(to_tensor(images[i:i + 64])).latent_dist.mean for i in range(0, 2048, 64)])
    vae.register_to_config(scaling_factor=float(1.0 / zs.std()))
    vae.save_pretrained(out)
    log(f"vae: done, latent std {zs.std():.4f} mean {zs.mean():.4f} -> scaling_factor "
        f"{vae.config.scaling_factor:.5f}; saved {out}", t0)
    return vae


def phase_latents(args, vae, images, t0):
    path = os.path.join(args.work, f"latents_seed{args.seed}_n{args.n}.npy")
    if os.path.exists(path):
        log("latents: loaded", t0)
        return np.load(path)
    vae.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            out.append(vae.encode(to_tensor(images[i:i + 128])).latent_dist.mean * vae.config.scaling_factor)
    lat = torch.cat(out).numpy().astype(np.float32)
    np.save(path, lat)
    log(f"latents: {lat.shape} std {lat.std():.3f} -> {path}", t0)
    return lat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=WORK, help="checkpoints and intermediate data")
    p.add_argument("--n", type=int, default=20000, help="data set size")
    p.add_argument("--vae-steps", type=int, default=1200, help="at most this many VAE steps")
    p.add_argument("--vae-minutes", type=float, default=10.0, help="VAE phase wall-time budget")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-fg-weight", type=float, default=8.0, help="extra loss weight on shape pixels")
    p.add_argument("--vae-init", default=None, help="continue VAE training from this folder")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae-fp32", action="store_true", help="no bf16 autocast in the VAE phase")
    p.add_argument("--threads", type=int, default=1,
                   help="1 is faster than 2 on a loaded 2-core machine (threads wait on each other)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    log(f"args: {vars(args)}; torch {torch.__version__}", t0)
    images, attrs = phase_data(args, t0)
    vae = phase_vae(args, images, t0, attrs)
    phase_latents(args, vae, images, t0)
    log(f"vae {nparams(vae):,} parameters; done", t0)


if __name__ == "__main__":
    main()
