"""Full-size architectures without downloads: build from a shipped config with random weights, export, cache.

Latency does not depend on weight values, so a seeded random initialisation of the real
architecture measures what a trained checkpoint would. The diffusers folder and every export are
cached under ``cache`` and reused while their inputs (config, seed, precision, target) are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from edgediff.runtime.errors import EdgediffError

KNOWN_MODELS = ("sd15", "sd21")
COMPONENT_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json")
# Graphs the benchmark needs (the VAE encoder is for img2img; not measured).
BENCH_GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # those the model has


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgediff" / "bench"


def config_source(model: str) -> Path:
    """``sd15``/``sd21`` name a shipped config; anything else is a folder laid out the same way."""
    from edgediff.models import configs_dir

    folder = configs_dir() / model if model in KNOWN_MODELS else Path(model)
    if not folder.is_dir():
        raise EdgediffError(f"unknown model {model!r}: give sd15, sd21 or a diffusers config folder")
    missing = [name for name in COMPONENT_CONFIGS if not (folder / name).is_file()]
    if missing:
        raise EdgediffError(f"{folder} is not a diffusers config folder (missing {', '.join(missing)})")
    return folder


def config_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json")):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def model_key(model: str, seed: int) -> str:
    folder = config_source(model)
    name = model if model in KNOWN_MODELS else folder.name
    return f"{name}-{config_digest(folder)}-seed{seed}"


def copy_config(model: str, dest: Path) -> Path:
    """The config folder plus the CLIP BPE files, as the exporter's single-file loader prepares it."""
    from edgediff.models import clip_tokenizer_dir

    source = config_source(model)
    shutil.copytree(source, dest)
    for name in ("vocab.json", "merges.txt"):
        target = dest / "tokenizer" / name
        if not target.exists():
            shutil.copy(clip_tokenizer_dir() / name, target)
    return dest


def build_pipeline(config: Path, seed: int = 0):
    """A float32 StableDiffusionPipeline with seeded random weights, from a config folder."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(config / "tokenizer"))
    scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipe


def ensure_model(model: str, cache: Path, seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """The diffusers folder of ``model`` with random weights, built once into ``cache``."""
    log = log or _stderr
    folder = Path(cache) / model_key(model, seed) / "diffusers"
    if (folder / "model_index.json").is_file() and (folder / ".complete").is_file():
        return folder
    partial = folder.with_name("diffusers.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {model} with random weights (seed {seed}) into {folder}")
    config = copy_config(model, partial.with_name("config"))
    try:
        pipe = build_pipeline(config, seed)
        pipe.save_pretrained(partial, safe_serialization=True)
    finally:
        shutil.rmtree(config, ignore_errors=True)
    (partial / ".complete").write_text(json.dumps({"model": model, "seed": seed}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def ensure_export(diffusers_folder: Path, precision: str, target: str, graphs: tuple[str, ...] = BENCH_GRAPHS,
                  log: Callable[[str], None] | None = None) -> Path:
    """``edgediff export`` of the folder at one precision/target, cached beside it."""
    log = log or _stderr
    out = Path(diffusers_folder).parent / f"export-{precision}-{target}"
    if (out / "manifest.json").is_file():
        return out
    from edgediff.exporter.export import export_model

    log(f"exporting {diffusers_folder} ({precision}, optimized for {target}) into {out}")
    export_model(str(diffusers_folder), out, precision=precision, optimize_for=target, graphs=graphs,
                 overwrite=True, log=log)
    return out


def _stderr(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)
