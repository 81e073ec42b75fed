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

KNOWN_MODELS = ("sd15", "sd21", "sdxl", "sd35m")
COMPONENT_CONFIGS = ("model_index.json", "vae/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json")
DENOISERS = ("unet/config.json", "transformer/config.json")  # one of them
# Graphs the benchmark needs (the VAE encoder is for img2img; not measured).
BENCH_GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # those the model has


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgediff" / "bench"


def config_source(model: str) -> Path:
    """``sd15``/``sd21``/``sdxl``/``sd35m`` name a shipped config; anything else is a folder laid out the same way."""
    from edgediff.models import configs_dir

    folder = configs_dir() / model if model in KNOWN_MODELS else Path(model)
    if not folder.is_dir():
        raise EdgediffError(f"unknown model {model!r}: give sd15, sd21, sdxl, sd35m or a diffusers config folder")
    missing = [name for name in COMPONENT_CONFIGS if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in DENOISERS):
        missing.append(" or ".join(DENOISERS))
    if missing:
        raise EdgediffError(f"{folder} is not a diffusers config folder (missing {', '.join(missing)})")
    return folder


def config_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json")):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def model_key(model: str, seed: int, half: tuple[str, ...] = ()) -> str:
    folder = config_source(model)
    name = model if model in KNOWN_MODELS else folder.name
    return f"{name}-{config_digest(folder)}-seed{seed}" + ("-fp16-" + "-".join(sorted(half)) if half else "")


def copy_config(model: str, dest: Path) -> Path:
    """The config folder plus the CLIP BPE files in every CLIP tokenizer folder, as the exporter's
    single-file loader prepares it, and a synthetic vocabulary in a T5 tokenizer folder (T5's own
    SentencePiece model cannot be downloaded here; the transformer sees a fixed 256-token window,
    so the benchmark's cost does not depend on which pieces a prompt becomes)."""
    from edgediff.models import clip_tokenizer_dir

    source = config_source(model)
    shutil.copytree(source, dest)
    for tokenizer in sorted(dest.glob("tokenizer*")):
        settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
        if settings.get("tokenizer_class", "").startswith("T5"):
            if not any((tokenizer / name).exists() for name in ("tokenizer.json", "spiece.model")):
                synthetic_t5_tokenizer(tokenizer, settings)
            continue
        for name in ("vocab.json", "merges.txt"):
            if not (tokenizer / name).exists():
                shutil.copy(clip_tokenizer_dir() / name, tokenizer / name)
    return dest


T5_PIECES = 32000  # T5 v1.1's SentencePiece vocabulary; its tokenizer adds 100 <extra_id_N>


def synthetic_t5_tokenizer(folder: Path, settings: dict) -> None:
    """A Unigram vocabulary of T5's size (pad 0, eos 1, unk 2 as in T5) over characters and letter
    groups, saved as tokenizer.json with the folder's own settings."""
    import itertools
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    groups = itertools.chain.from_iterable(itertools.product(string.ascii_lowercase, repeat=n) for n in (2, 3, 4))
    vocab += [("\u2581" + "".join(g), -1.0 - len(g)) for g in itertools.islice(groups, T5_PIECES - len(vocab))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=int(settings.get("extra_ids", 100)),
                            model_max_length=int(settings.get("model_max_length", 512)))
    tokenizer.save_pretrained(str(folder))


# Weighted components in the order their random weights are drawn from one seeded generator (the
# SD 1.x/2.x order of the first version, so those cached models keep their weights).
WEIGHTED_ORDER = ("unet", "vae", "text_encoder", "text_encoder_2")
SHARD = "1GB"  # save_pretrained's shard size: the builder's peak is one module plus about this
# Components stored in fp16 by default, per shipped model: SD 3.5's T5-XXL encoder (19 GB in fp32)
# and MMDiT (9.9 GB) are distributed in 16 bits; fp32 copies would not fit beside an export here.
HALF_STORED = {"sd35m": ("transformer", "text_encoder_3")}


def build_model(config: Path, dest: Path, seed: int = 0, log: Callable[[str], None] | None = None,
                half: tuple[str, ...] = ()) -> None:
    """A diffusers folder with seeded random float32 weights from a config folder, whatever pipeline its
    model_index.json names: each component is built, saved and freed before the next, so the peak is
    the largest module (the SDXL U-Net: 10.3 GB) rather than the whole pipeline. Components in ``half``
    are built and saved in fp16, as such models are distributed (T5-XXL: 19 GB in fp32, 9.5 GB in
    fp16); the exporter reads them back a block at a time."""
    import gc
    import importlib

    import torch

    log = log or _stderr
    index = json.loads((config / "model_index.json").read_text())
    entries = {name: entry for name, entry in index.items()
               if not name.startswith("_") and isinstance(entry, list) and None not in entry}
    unknown = [name for name in entries if name not in WEIGHTED_ORDER and not _unweighted(name)]
    order = [name for name in WEIGHTED_ORDER if name in entries] + sorted(unknown)
    torch.manual_seed(seed)
    for name in order:
        cls = getattr(importlib.import_module(entries[name][0]), entries[name][1])
        torch.set_default_dtype(torch.float16 if name in half else torch.float32)
        try:
            with torch.no_grad():
                if hasattr(cls, "load_config"):  # diffusers
                    module = cls.from_config(cls.load_config(config / name))
                else:  # transformers
                    module = cls(cls.config_class.from_pretrained(config / name))
        finally:
            torch.set_default_dtype(torch.float32)
        module.eval().save_pretrained(dest / name, safe_serialization=True, max_shard_size=SHARD)
        count = sum(p.numel() for p in module.parameters())
        del module
        gc.collect()
        log(f"  {name}: {entries[name][1]}, {count / 1e6:.1f} M parameters saved"
            + (" (fp16)" if name in half else ""))
    for name, (library, class_name) in entries.items():
        if name in order:
            continue
        cls = getattr(importlib.import_module(library), class_name)
        if "scheduler" in name:  # the x4 upscaler's low_res_scheduler too
            cls.from_config(cls.load_config(config / name)).save_pretrained(dest / name)
        else:
            cls.from_pretrained(str(config / name)).save_pretrained(str(dest / name))
    shutil.copy(config / "model_index.json", dest / "model_index.json")  # last: the folder is whole


def _unweighted(name: str) -> bool:
    return name.startswith("tokenizer") or "scheduler" in name


def ensure_model(model: str, cache: Path, seed: int = 0, log: Callable[[str], None] | None = None,
                 half: tuple[str, ...] | None = None) -> Path:
    """The diffusers folder of ``model`` with random weights, built once into ``cache``; ``half``:
    the components stored in fp16 (default: those the model's HALF_STORED entry names)."""
    log = log or _stderr
    half = HALF_STORED.get(model, ()) if half is None else tuple(half)
    folder = Path(cache) / model_key(model, seed, half) / "diffusers"
    if (folder / "model_index.json").is_file() and (folder / ".complete").is_file():
        return folder
    partial = folder.with_name("diffusers.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"building {model} with random weights (seed {seed}) into {folder}")
    shutil.rmtree(partial.with_name("config"), ignore_errors=True)
    config = copy_config(model, partial.with_name("config"))
    try:
        build_model(config, partial, seed, log, half=half)
    finally:
        shutil.rmtree(config, ignore_errors=True)
    (partial / ".complete").write_text(json.dumps({"model": model, "seed": seed}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def export_folder(diffusers_folder: Path, precision: str, target: str) -> Path:
    """Where the bench keeps (and looks for) the export of a built model at one precision/target."""
    return Path(diffusers_folder).parent / f"export-{precision}-{target}"


def ensure_export(diffusers_folder: Path, precision: str, target: str, graphs: tuple[str, ...] = BENCH_GRAPHS,
                  log: Callable[[str], None] | None = None) -> Path:
    """``edgediff export`` of the folder at one precision/target, cached beside it."""
    log = log or _stderr
    out = export_folder(diffusers_folder, precision, target)
    if (out / "manifest.json").is_file():
        return out
    from edgediff.exporter.export import export_model

    log(f"exporting {diffusers_folder} ({precision}, optimized for {target}) into {out}")
    export_model(str(diffusers_folder), out, precision=precision, optimize_for=target, graphs=graphs,
                 overwrite=True, log=log)
    return out


def _stderr(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)
