"""One generation request, checked once: every rule about a generation's arguments lives here.

The Python API (``Pipeline.__call__``'s keywords), the CLI, the A1111 server and batch job lines
all build a :class:`GenerationRequest` and show its errors; none of them checks a value itself.
:meth:`GenerationRequest.check_fields` holds the rules that need no model (types, ranges, names);
:meth:`GenerationRequest.check` adds those that read the manifest (size multiple, step limit,
default size) and returns the request with every value in its final form.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import arguments as args
from .conditioning import check_size_pair
from .errors import InputError
from .hires import check_hires, target_size
from .noise import NOISE_SOURCES
from .upscale import DEFAULT_NOISE_LEVEL

DEFAULT_SAMPLER = "dpmpp_2m_karras"
PROMPT_SYNTAXES = ("a1111", "plain")
# A1111's largest mask blur is 64; past a few hundred pixels a blur is a flat mask, and its kernel
# (5 sigma taps) would be allocated whole (1e9 asked for 37 GiB).
MAX_MASK_BLUR = 256.0
StepCallback = Callable[[int, int, np.ndarray], None]  # (step, steps, latents)


def default_model(gpu: bool) -> tuple[Path, str]:
    """The shipped default model and its precision: GPUs get the fp16 export where it exists;
    the CPU runs fp32 faster (fp16 graphs on the CPU run through casts, benchmarks/RESULTS.md)."""
    from edgediff.models import default_model_dir as shipped

    fp16 = shipped("fp16")
    return (fp16, "fp16") if gpu and fp16.is_dir() else (shipped(), "fp32")


def default_model_dir(provider: str = "auto") -> Path:
    """The default model for ``provider`` (Pipeline.load without a folder)."""
    from .sessions import resolve_provider

    return default_model(resolve_provider(provider) in ("cuda", "tensorrt", "dml"))[0]


@dataclass
class GenerationRequest:
    """``Pipeline.__call__``'s keywords, with their defaults (its docstring says what each means)."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    steps: int = 20
    guidance: float = 7.5
    sampler: str = DEFAULT_SAMPLER
    schedule: str | None = None
    seed: Any = None  # int, None, or one per prompt
    width: int | None = None
    height: int | None = None
    latents: np.ndarray | None = None
    rng: Any = None
    on_step: StepCallback | None = None
    image: Any = None  # PIL image, array or path
    strength: float = 0.8
    mask: Any = None
    mask_blur: float = 0.0
    mask_invert: bool = False
    noise: str = "numpy"
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    check_memory: bool = True
    loras: Sequence[tuple[str | Path, float]] | None = None
    embeddings: Sequence[str | Path] | None = None
    lora_dir: str | Path | None = None
    allow_pickle: bool = False
    vae_tiling: bool | None = None
    prompt_syntax: str = "a1111"
    control: Any = None  # ControlNet units: dicts or ControlUnits (runtime/controlnet.py)
    t5: str | None = None  # SD 3/3.5: "on" | "off" (runtime/text_conditioning.py)
    skip_layer_guidance: bool | dict | None = None  # SD 3.5 (runtime/flow.py)
    hires: Any = None  # dict (runtime/hires.py HiresFix's fields) or HiresFix; check makes it a HiresFix
    image_guidance: float | None = None  # InstructPix2Pix: the picture's guidance (None: 1.5)
    noise_level: int | None = None  # the x4 upscaler: noise added to the picture (None: 20)
    # Set by the hires fix's second pass (runtime/hires.py): img2img from this sampler-space latent.
    start_latent: np.ndarray | None = field(default=None, repr=False)
    # Filled by check(): the prompts as lists, the picture as given (before resizing).
    negatives: list[str] = field(default_factory=list, repr=False)
    original_image: Image.Image | None = field(default=None, repr=False)

    @classmethod
    def from_kwargs(cls, prompt, negative_prompt="", **kwargs) -> "GenerationRequest":
        names = {f.name for f in dataclasses.fields(cls) if f.init} - set(INTERNAL_FIELDS)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputError(f"unknown argument {unknown[0]!r}")
        return cls(prompt, negative_prompt, **kwargs)

    def check_fields(self) -> "GenerationRequest":
        """The rules that need no model; returns the request with names normalised."""
        from .samplers import normalize_schedule, resolve_sampler

        prompts = args.prompt_list(self.prompt, "prompt")
        negatives = [self.negative_prompt] * len(prompts) if isinstance(self.negative_prompt, str) else \
            args.prompt_list(self.negative_prompt, "negative_prompt")
        args.prompt_list(negatives, "negative_prompt")
        if not prompts:
            raise InputError("give at least one prompt")
        if len(negatives) != len(prompts):
            raise InputError("give one negative prompt per prompt")
        if not args.is_whole(self.steps) or self.steps < 1:
            raise InputError(f"steps must be a whole number >= 1, not {args.short(self.steps)}")
        guidance = args.check_guidance(self.guidance)
        args.check_name(self.sampler, "sampler")
        resolve_sampler(self.sampler)
        schedule = normalize_schedule(args.check_name(self.schedule, "schedule"))
        if self.noise not in NOISE_SOURCES:
            raise InputError(f"unknown noise source {self.noise!r}; expected one of {', '.join(NOISE_SOURCES)}")
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise InputError(f"unknown prompt syntax {args.short(self.prompt_syntax)}; expected one of "
                             f"{', '.join(PROMPT_SYNTAXES)}")
        if self.image is not None:  # txt2img ignores it
            _check_strength(self.strength)
        _check_mask_blur(self.mask_blur)
        check_vae_tiling(self.vae_tiling)
        sizes = {name: None if getattr(self, name) is None else check_size_pair(name, getattr(self, name))
                 for name in ("original_size", "target_size", "crops_coords_top_left")}
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        for seed in seeds:
            args.check_seed(seed)
        if self.mask is not None and self.image is None:
            raise InputError("a mask needs the image it applies to (--mask needs --image; mask= needs image=)")
        from .controlnet import control_units

        hires = None if self.hires is None else check_hires(self.hires)
        if hires is not None and self.image is not None:
            raise InputError("the hires fix is for text-to-image: give no image with it (--hires-* needs no --image)")
        if self.start_latent is not None:
            _check_strength(self.strength)
        image_guidance = self.image_guidance
        if image_guidance is not None:
            if not args.is_real(image_guidance) or not math.isfinite(image_guidance) or not 0 <= image_guidance <= 100:
                raise InputError(f"image guidance must be a number from 0 to 100, not {args.short(image_guidance)}")
            image_guidance = float(image_guidance)
        if self.noise_level is not None and (not args.is_whole(self.noise_level) or self.noise_level < 0):
            raise InputError(f"noise_level must be a whole number >= 0, not {args.short(self.noise_level)}")
        return dataclasses.replace(self, prompt=prompts, negatives=negatives, steps=int(self.steps),
                                   guidance=guidance, schedule=schedule, hires=hires,
                                   control=control_units(self.control) or None,
                                   image_guidance=image_guidance, **sizes)

    def check(self, manifest) -> "GenerationRequest":
        """All rules, with the model's: sizes default to the picture's, else the model's own."""
        from .images import to_rgb

        request = self.check_fields()
        limit = int(manifest.scheduler.get("num_train_timesteps") or 1000)
        if request.steps > limit:
            raise InputError(f"steps must be at most {limit} (the model's training timesteps), not {request.steps}")
        image = to_rgb(request.image) if request.image is not None else None
        # A request checked before keeps the picture as first given (the mask's aspect is checked on it).
        original = request.original_image if request.original_image is not None else image
        # An x4 upscaler's size is its output's: the picture enters at 1/scale of it (the latent's size).
        scale = check_upscale(request, manifest)
        width = request.width if request.width is not None or image is None else image.width * scale
        height = request.height if request.height is not None or image is None else image.height * scale
        width, height = (args.check_side(label, manifest.default_size if value is None else value,
                                         manifest.size_multiple)
                         for label, value in (("width", width), ("height", height)))
        if image is not None and image.size != (width // scale, height // scale):
            image = image.resize((width // scale, height // scale), Image.LANCZOS)  # as diffusers' image processor
        text_encoders(manifest, request.t5)
        skip_layers(manifest, request.skip_layer_guidance)
        hires = request.hires if request.hires is None else dataclasses.replace(
            request.hires, target=target_size(request.hires, width, height, manifest.size_multiple))
        noise_level = request.noise_level if not manifest.upscale or request.noise_level is not None \
            else DEFAULT_NOISE_LEVEL
        return dataclasses.replace(request, image=image, original_image=original, width=width, height=height,
                                   hires=hires, noise_level=noise_level)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Pipeline.__call__`` that make this request."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in REQUEST_FIELDS}


def check_upscale(request, manifest) -> int:
    """How many output pixels a picture pixel becomes (1 but on an x4 upscaler), with the rules
    only an upscaler has: a picture, a noise level within its schedule, and nothing it cannot take."""
    if not manifest.upscale:
        if request.noise_level is not None:
            raise InputError("noise_level is for x4 upscaler models (a U-Net fed the noised picture); "
                             "this model has none")
        return 1
    if request.image is None:
        raise InputError("this is an x4 upscaler model: give it the picture to upscale "
                         "(edgediff upscale IMAGE --model DIR, or image=)")
    highest = int(manifest.upscale.get("max_noise_level", 0))
    if request.noise_level is not None and request.noise_level > highest:
        raise InputError(f"noise_level must be from 0 to {highest} (the model's max_noise_level), "
                         f"not {request.noise_level}")
    unsupported = [name for name, value in (("mask", request.mask), ("hires", request.hires),
                                            ("image_guidance", request.image_guidance),
                                            ("control", request.control)) if value]
    if unsupported:
        raise InputError(f"an x4 upscaler model takes no {unsupported[0]}")
    return manifest.vae_scale_factor


def text_encoders(manifest, t5) -> list[str]:
    """The text encoder graphs a request runs (``t5`` switches SD3's off; InputError where it cannot)."""
    from .text_conditioning import switched_on

    return switched_on(manifest.conditioning.get("text", {}), manifest.text_encoders, t5=t5)


def skip_layers(manifest, setting) -> dict | None:
    """The skip-layer guidance a request asks for (None: off), checked against the transformer."""
    from .flow import skip_layer_guidance

    inputs = {spec.name: spec for spec in manifest.graphs["unet"].inputs}
    layers = inputs["skip_layers"].shape[1] if "skip_layers" in inputs else 0
    return skip_layer_guidance(setting, manifest.conditioning.get("skip_layer_guidance", {}), layers)


def check_vae_tiling(vae_tiling) -> None:
    if vae_tiling is not None and not isinstance(vae_tiling, (bool, np.bool_)):
        raise InputError(f"vae_tiling must be True, False or None, not {vae_tiling!r}")


def _check_strength(strength) -> None:
    if not args.is_real(strength) or not 0.0 < float(strength) <= 1.0:
        raise InputError(f"strength must be a number in (0, 1], not {args.short(strength)}")


def _check_mask_blur(blur) -> None:
    if not args.is_real(blur) or not math.isfinite(blur) or not 0.0 <= blur <= MAX_MASK_BLUR:
        shown = f"{blur:g}" if args.is_real(blur) else args.short(blur)  # 1e9 and 10**9 alike
        raise InputError(f"mask_blur must be a number of pixels from 0 to {MAX_MASK_BLUR:g}, not {shown}")


INTERNAL_FIELDS = ("negatives", "original_image", "start_latent")
REQUEST_FIELDS = [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in INTERNAL_FIELDS]
