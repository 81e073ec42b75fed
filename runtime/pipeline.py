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

from .denoiser import make_denoiser
from .errors import EdgediffError
from .manifest import Manifest, read_manifest
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

    def __init__(self, model_dir: Path, manifest: Manifest, sessions: Sessions, tokenizer: ClipTokenizer,
                 alphas_cumprod: np.ndarray):
        self.model_dir = model_dir
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.alphas_cumprod = alphas_cumprod

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, provider: str = "auto", memory: str = "high",
             warn: Callable[[str], None] | None = None, threads: int | None = None) -> "Pipeline":
        """Open an exported model folder (the shipped default model when ``model_dir`` is None).

        ``memory="low"`` loads one graph at a time and releases it after its stage; ``"high"``
        keeps every graph resident after first use (faster for repeated generations).
        ``threads``: ONNX Runtime's intra-op threads (default: one per core).
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
        tokenizer = ClipTokenizer.from_manifest(model_dir, manifest.tokenizer)
        alphas_cumprod = np.load(model_dir / manifest.alphas_cumprod).astype(np.float64)
        sessions = Sessions(model_dir, manifest, provider, memory, warn=warn, threads=threads)
        return cls(model_dir, manifest, sessions, tokenizer, alphas_cumprod)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 steps: int = 20, guidance: float = 7.5, sampler: str = DEFAULT_SAMPLER,
                 schedule: str | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, latents: np.ndarray | None = None,
                 rng: np.random.Generator | None = None, on_step: StepCallback | None = None,
                 image: Image.Image | np.ndarray | None = None, strength: float = 0.8) -> Result:
        """Generate one image per prompt.

        ``latents``: unit-variance starting noise (batch, channels, height/f, width/f); it is scaled
        by the sampler's initial sigma as diffusers does, so runs compare with diffusers'. Without
        it, noise comes from ``rng`` (or a generator seeded with ``seed``; a fresh seed if None).

        ``image`` (img2img): start from this picture's latent, noised to the sigma where a
        ``strength`` fraction of the steps remains, as diffusers' img2img pipeline does.
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
        if not math.isfinite(guidance) or guidance < 0:
            raise EdgediffError(f"guidance must be a finite number >= 0, not {guidance!r}")
        plan = make_plan(sampler, self.alphas_cumprod, self.manifest.scheduler, steps, schedule=schedule,
                         strength=strength if image is not None else 1.0)
        m = self.manifest
        shape = (len(prompts), m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if rng is None:
            seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None and latents is None else seed
            rng = np.random.default_rng(seed)
        timings: dict[str, float] = {}
        guided = guidance > 1.0  # as diffusers: guidance 1 or below means the conditional model alone

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

        with self._stage("text_encoder", timings) as text_encoder:
            (context,) = text_encoder.run(input_ids=self.tokenizer(prompts + negatives if guided else prompts))
        cond, uncond = (context[: len(prompts)], context[len(prompts):]) if guided else (context, None)

        with self._stage("unet", timings) as unet:
            def run_unet(x_in, t, ctx):
                return unet.run(sample=x_in, timestep=t, encoder_hidden_states=ctx)[0]

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
