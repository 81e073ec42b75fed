"""Load a Stable Diffusion 1.x/2.x or SDXL model from a diffusers folder, a single file or a hub id."""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from edgediff.runtime.errors import EdgediffError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Pipeline class in model_index.json -> the diffusers class that loads its components.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    # Inpainting pipelines export like any other: their U-Net's input channels tell the runtime.
    "StableDiffusionInpaintPipeline": "StableDiffusionPipeline",
    "StableDiffusionInstructPix2PixPipeline": "StableDiffusionPipeline",  # likewise (8 channels)
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline": "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline": "StableDiffusion3Pipeline",
    # The x4 upscaler: recognised from its components (exporter/upscaler.py), not from this name.
    "StableDiffusionUpscalePipeline": "StableDiffusionUpscalePipeline",
}
# Keys that tell original-format checkpoints apart: only OpenCLIP (SD 2.x) text encoders have the
# first; only SDXL's second text encoder (OpenCLIP bigG, in the "conditioner") has the second.
SD2_TEXT_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SDXL_TEXT_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def _configs_dir() -> Path:
    from edgediff.models import configs_dir

    return configs_dir()


def check_source(source: str, *, allow_pickle: bool = False) -> str:
    """Cheap checks before anything is loaded or written; returns the source kind."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise EdgediffError(f"{path} is not a diffusers model folder (no model_index.json)")
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except ValueError:
            raise EdgediffError(f"{index} is not valid JSON") from None
        if cls not in SUPPORTED_PIPELINES:
            raise EdgediffError(f"{path} holds a {cls}; edgediff exports Stable Diffusion 1.x, 2.x, SDXL, "
                                "SD 3/3.5 and x4 upscaler pipelines")
        return "diffusers-folder"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in SINGLE_FILE_SUFFIXES:
            raise EdgediffError(f"{path}: expected a diffusers folder or a .safetensors/.ckpt checkpoint")
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise EdgediffError(
                f"{path} is a pickled checkpoint: loading it runs code from the file. Convert it to "
                ".safetensors, or pass --allow-pickle if you trust its source"
            )
        return "single-file"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.suffix:
        return "hub"
    raise EdgediffError(f"export source not found: {source}")


def load_pipeline(source: str, *, allow_pickle: bool = False, prediction_type: str | None = None,
                  config: str | Path | None = None):
    """Return a float32 Stable Diffusion (or SDXL) pipeline on the CPU and a description of its source."""
    from diffusers import StableDiffusionPipeline

    kind = check_source(source, allow_pickle=allow_pickle)
    path = Path(source)
    if kind == "diffusers-folder":
        loader = _pipeline_class(json.loads((path / "model_index.json").read_text())["_class_name"])
        try:
            with warnings.catch_warnings():  # torch_dtype's rename in newer diffusers
                warnings.simplefilter("ignore", FutureWarning)
                pipe = loader.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True,
                                              **_no_safety_checker(loader))
        except Exception as error:  # diffusers raises many types for unreadable weights/configs
            raise EdgediffError(f"could not load {path}: {str(error).splitlines()[0][:300]}") from None
        origin = {"kind": kind, "path": str(path.resolve())}
    elif kind == "single-file":
        pipe = _load_single_file(path, prediction_type, Path(config) if config else None)
        origin = {"kind": kind, "path": str(path.resolve())}
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None)
        except Exception as error:  # hub errors come in many types; one line is what the user needs
            raise EdgediffError(f"could not load '{source}' from the hub: {str(error).splitlines()[0]}") from None
        origin = {"kind": "hub", "id": source}

    if prediction_type:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe, origin


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, SUPPORTED_PIPELINES[name])


def _no_safety_checker(loader) -> dict:
    """SD 1.x/2.x pipelines have a safety-checker slot (left empty); SDXL pipelines have none."""
    return {"safety_checker": None} if loader.__name__ == "StableDiffusionPipeline" else {}


def _shipped_config(keys: set[str]) -> str:
    if SDXL_TEXT_KEY in keys:
        return "sdxl"
    return "sd21" if SD2_TEXT_KEY in keys else "sd15"


def _load_single_file(path: Path, prediction_type: str | None, config_dir: Path | None):
    """Single-file checkpoints carry no config: take ``config_dir`` (a diffusers folder without
    weights) or the shipped config of the family the checkpoint's keys reveal."""
    hint = ""
    if config_dir is None:
        config_dir = _configs_dir() / _shipped_config(_checkpoint_keys(path))
        hint = (f" (read with the shipped {config_dir.name} config; for another architecture pass --config "
                "with a diffusers folder of it)")
    elif not (config_dir / "model_index.json").is_file():
        raise EdgediffError(f"--config {config_dir} is not a diffusers config folder (no model_index.json)")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / config_dir.name
        shutil.copytree(config_dir, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
        for tokenizer in (config / "tokenizer", config / "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):  # shipped once, in models/clip_tokenizer
                if tokenizer.is_dir() and not (tokenizer / name).exists():
                    shutil.copy(_configs_dir().parent / "clip_tokenizer" / name, tokenizer / name)
        loader = _pipeline_class(json.loads((config / "model_index.json").read_text())["_class_name"])
        try:
            pipe = loader.from_single_file(
                str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
                **_no_safety_checker(loader),
                **({"prediction_type": prediction_type} if prediction_type else {}),
            )
        except Exception as error:
            message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise EdgediffError(f"could not read {path} as a Stable Diffusion checkpoint: {message}{hint}") from None
    return pipe


def _checkpoint_keys(path: Path) -> set[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except Exception as error:
            raise EdgediffError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)  # consent given by the caller
    except Exception as error:  # unpickling raises many types
        raise EdgediffError(f"{path} is not a readable PyTorch checkpoint ({str(error).strip()[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgediffError(f"{path} holds a {type(state).__name__}, not a checkpoint's state dict")
    return set(state.keys())


def load_components(source: str, *, allow_pickle: bool = False, prediction_type: str | None = None,
                    config: str | Path | None = None, text_encoders: str | Path | None = None,
                    log=None):
    """The model's parts and a description of its source; a diffusers folder's weights (and an SD3
    single file's) are read component by component when a graph needs them, other sources are
    loaded whole. ``text_encoders``: a diffusers SD3 folder for text encoders an SD3 file lacks."""
    from .components import from_folder, from_pipeline

    kind = check_source(source, allow_pickle=allow_pickle)
    path = Path(source)
    if kind == "diffusers-folder":
        return from_folder(path, prediction_type), {"kind": "diffusers-folder", "path": str(path.resolve())}
    if kind == "single-file" and path.suffix.lower() == ".safetensors":
        from . import sd3_file

        keys = _checkpoint_keys(path)
        if sd3_file.is_sd3_file(keys):
            return _sd3_components(path, keys, prediction_type, config, text_encoders, log), \
                {"kind": kind, "path": str(path.resolve())}
    if text_encoders is not None:
        raise EdgediffError(f"--text-encoders is for SD 3/3.5 single files; {source} is not one")
    pipe, origin = load_pipeline(source, allow_pickle=allow_pickle, prediction_type=prediction_type, config=config)
    return from_pipeline(pipe), origin


def _sd3_components(path: Path, keys: set[str], prediction_type, config, text_encoders, log):
    from . import sd3_file

    if config is None:
        name = sd3_file.shipped_config(keys)
        config = _configs_dir() / name
        if not (config / "model_index.json").is_file():
            raise EdgediffError(f"{path.name} looks like {name} (from its keys), for which edgediff ships no config: "
                                "pass --config with a diffusers folder of that model (its configs are enough)")
    config = Path(config)
    if not (config / "model_index.json").is_file():
        raise EdgediffError(f"--config {config} is not a diffusers config folder (no model_index.json)")
    if text_encoders is not None and not Path(text_encoders).is_dir():
        raise EdgediffError(f"--text-encoders {text_encoders} is not a folder (a diffusers SD3 folder is expected)")
    with tempfile.TemporaryDirectory() as tmp:
        return sd3_file.from_sd3_file(path, config, Path(text_encoders) if text_encoders else None, prediction_type,
                                      _configs_dir().parent / "clip_tokenizer", Path(tmp) / "config",
                                      log or (lambda line: None))
