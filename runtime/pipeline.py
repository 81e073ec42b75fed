"""Text to image without torch: tokenize, encode, sample, decode. The pipeline only orchestrates."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .conditioning import check_size_pair, embeds_guidance, guidance_embedding, size_ids
from .denoiser import make_denoiser
from .errors import EdgediffError
from .manifest import Manifest, read_manifest
from .noise import NOISE_SOURCES, make_rng
from .samplers import make_plan
from .sessions import GraphSession, Sessions, resolve_provider
from .tokenizer import ClipTokenizer

DEFAULT_SAMPLER = "dpmpp_2m_karras"
StepCallback = Callable[[int, int, np.ndarray], None]  # (step, steps, latents)


@dataclass
class Result:
    images: list[Image.Image]
    pixels: np.ndarray  # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Pipeline:
    """An exported model, ready to generate. Build it with :meth:`Pipeline.load`."""

    def __init__(self, model_dir: Path, manifest: Manifest, sessions: Sessions, tokenizers: list[ClipTokenizer],
                 alphas_cumprod: np.ndarray):
        self.model_dir = model_dir
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizers = tokenizers  # one per text encoder, in manifest order
        self.tokenizer = tokenizers[0]
        self.alphas_cumprod = alphas_cumprod

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, provider: str = "auto", memory: str = "high",
             warn: Callable[[str], None] | None = None) -> "Pipeline":
        """Open an exported model folder (the shipped default model when ``model_dir`` is None).

        ``memory="low"`` loads one graph at a time and releases it after its stage; ``"high"``
        keeps every graph resident after first use (faster for repeated generations).
        """
        if model_dir is None:
            from edgediff.models import default_model_dir

            # GPUs get the shipped fp16 export where it exists; the CPU runs fp32 faster (DESIGN.md).
            gpu = resolve_provider(provider) in ("cuda", "tensorrt", "dml")
            model_dir = default_model_dir("fp16")
            if not (gpu and model_dir.is_dir()):
                model_dir = default_model_dir()
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        tokenizers = [ClipTokenizer.from_manifest(model_dir, encoder["tokenizer"]) for encoder in manifest.text_encoders]
        alphas_cumprod = np.load(model_dir / manifest.alphas_cumprod).astype(np.float64)
        sessions = Sessions(model_dir, manifest, provider, memory, warn=warn)
        return cls(model_dir, manifest, sessions, tokenizers, alphas_cumprod)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 steps: int = 20, guidance: float = 7.5, sampler: str = DEFAULT_SAMPLER,
                 schedule: str | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, latents: np.ndarray | None = None,
                 rng: np.random.Generator | None = None, on_step: StepCallback | None = None,
                 image: Image.Image | np.ndarray | None = None, strength: float = 0.8,
                 noise: str = "numpy", original_size: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0)) -> Result:
        """Generate one image per prompt.

        ``latents``: unit-variance starting noise (batch, channels, height/f, width/f); it is scaled
        by the sampler's initial sigma as diffusers does, so runs compare with diffusers'. Without
        it, noise comes from ``rng`` (or a generator seeded with ``seed``; a fresh seed if None).
        ``noise``: the generator ``seed`` seeds: ``"numpy"`` (``numpy.random.default_rng``) or
        ``"torch-cpu"`` (``torch.randn`` with ``torch.Generator().manual_seed(seed)``, as diffusers
        and ComfyUI on the CPU draw it; the sampler's noise follows from the same stream).

        ``image`` (img2img): start from this picture's latent, noised to the sigma where a
        ``strength`` fraction of the steps remains, as diffusers' img2img pipeline does.

        ``original_size``, ``target_size`` (height, width; default: the output size) and
        ``crops_coords_top_left`` are SDXL's micro-conditioning, used by U-Nets that take size ids.
        """
        started = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise EdgediffError("give one negative prompt per prompt")
        if image is not None:
            image = _as_rgb(image)
            width = image.width if width is None else width
            height = image.height if height is None else height
        width, height = self._check_size(width, height)
        if image is not None and image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)  # as diffusers' image processor
        if not isinstance(steps, int) or steps < 1:
            raise EdgediffError(f"steps must be a whole number of at least 1, not {steps!r}")
        if noise not in NOISE_SOURCES:
            raise EdgediffError(f"unknown noise source {noise!r}; expected one of {', '.join(NOISE_SOURCES)}")
        if not math.isfinite(guidance) or guidance < 0:
            raise EdgediffError(f"guidance must be a finite number >= 0, not {guidance!r}")
        plan = make_plan(sampler, self.alphas_cumprod, self.manifest.scheduler, steps, schedule=schedule,
                         strength=strength if image is not None else 1.0)
        m = self.manifest
        shape = (len(prompts), m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if rng is None:
            seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None and latents is None else seed
            rng = make_rng(noise, seed)
        timings: dict[str, float] = {}
        unet_inputs = {spec.name: spec for spec in m.graphs["unet"].inputs}
        # As diffusers: guidance 1 or below means the conditional model alone, and a U-Net that
        # embeds the guidance scale (LCM) runs once per step with it.
        guided = guidance > 1.0 and not embeds_guidance(unet_inputs)

        if image is not None:
            with self._stage("vae_encoder", timings) as vae_encoder:
                pixels_in = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
                mean, std = vae_encoder.run(sample=np.repeat(pixels_in, len(prompts), axis=0))
            # diffusers samples the posterior first, then draws the noise that img2img adds.
            posterior = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
            x0 = (posterior - np.float32(m.shift_factor)) * np.float32(m.scaling_factor)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif tuple(np.shape(latents)) != shape:
            raise EdgediffError(f"latents must have shape {shape} for this prompt count and size, "
                                f"not {tuple(np.shape(latents))}")
        noise = np.asarray(latents, dtype=np.float32)
        # Sampling happens in sigma space: x = clean latent + sigma * noise.
        if image is not None:
            x = x0 + noise * np.float32(plan.sigmas[0])
        else:
            x = noise * np.float32(plan.init_noise_sigma)

        context = self._encode_text(prompts + negatives if guided else prompts, timings)
        if guided and m.conditioning.get("force_zeros_for_empty_prompt"):
            for row, negative in enumerate(negatives, len(prompts)):  # as diffusers without a negative prompt
                if not negative:
                    for value in context.values():
                        value[row] = 0.0
        n = len(prompts)
        if "time_ids" in unet_inputs:
            own = (height, width)
            ids = size_ids(m.conditioning.get("time_ids", ()),
                           original_size=check_size_pair("original_size", original_size or own),
                           target_size=check_size_pair("target_size", target_size or own),
                           crops_coords_top_left=check_size_pair("crops_coords_top_left", crops_coords_top_left),
                           batch=len(context["encoder_hidden_states"]))
            context["time_ids"] = ids
        if "timestep_cond" in unet_inputs:
            context["timestep_cond"] = guidance_embedding(guidance, unet_inputs["timestep_cond"].shape[1], n)
        context = {name: value for name, value in context.items() if name in unet_inputs}
        cond = {name: value[:n] for name, value in context.items()}
        uncond = {name: value[n:] for name, value in context.items()} if guided else None

        with self._stage("unet", timings) as unet:
            def run_unet(x_in, t, ctx):
                return unet.run(sample=x_in, timestep=t, **ctx)[0]

            denoise = make_denoiser(run_unet, plan.timestep, m.prediction_type, cond, uncond, guidance)
            def callback(i, sigma, x_i, denoised):
                on_step(i + 1, plan.steps, x_i)

            x = plan.run(denoise, x, rng=rng, on_step=callback if on_step is not None else None)
        timings["unet_per_step"] = timings["unet"] / plan.steps

        with self._stage("vae_decoder", timings) as vae_decoder:
            (decoded,) = vae_decoder.run(latent_sample=x / np.float32(m.scaling_factor) + np.float32(m.shift_factor))
        pixels = np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0).astype(np.float32)
        timings["total"] = time.perf_counter() - started
        images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
        return Result(images=images, pixels=pixels, seed=seed, timings=timings)

    def _encode_text(self, texts: list[str], timings: dict[str, float]) -> dict[str, np.ndarray]:
        """Each text encoder's per-token states, concatenated along the features as the U-Net takes
        them, and the pooled embedding where an encoder gives one (SDXL's second)."""
        hidden, context = [], {}
        for encoder, tokenizer in zip(self.manifest.text_encoders, self.tokenizers):
            with self._stage(encoder["graph"], timings) as session:
                outputs = session.run(input_ids=tokenizer(texts))
            hidden.append(outputs[0])
            for spec, value in zip(session.entry.outputs[1:], outputs[1:]):
                context[spec.name] = value
        context["encoder_hidden_states"] = np.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        return context

    @contextmanager
    def _stage(self, graph: str, timings: dict[str, float]) -> Iterator[GraphSession]:
        """Time one stage; session creation is reported apart, as ``load_<graph>``."""
        started = time.perf_counter()
        loaded_before = self.sessions.load_seconds.get(graph, 0.0)
        with self.sessions.use(graph) as session:
            yield session
        load = self.sessions.load_seconds.get(graph, 0.0) - loaded_before
        timings[graph] = time.perf_counter() - started - load
        if load:
            timings[f"load_{graph}"] = load

    def _check_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        multiple = self.manifest.size_multiple
        sides = []
        for label, value in (("width", width), ("height", height)):
            value = self.manifest.default_size if value is None else value
            if not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
                raise EdgediffError(f"{label} must be a positive multiple of {multiple} for this model, "
                                    f"not {value!r}")
            sides.append(int(value))
        return sides[0], sides[1]


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise EdgediffError(f"image arrays must be uint8 (height, width, 3), not {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    return image.convert("RGB")
