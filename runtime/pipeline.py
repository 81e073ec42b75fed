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
from .inpaint import keep_known, masked_pixels, prepare_mask
from .prompts import encode_prompts
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
    seeds: list[int] | None = None  # one per image when ``seed`` was given as a list


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
        tokenizer = ClipTokenizer.from_manifest(model_dir, manifest.tokenizer)
        alphas_cumprod = np.load(model_dir / manifest.alphas_cumprod).astype(np.float64)
        sessions = Sessions(model_dir, manifest, provider, memory, warn=warn)
        return cls(model_dir, manifest, sessions, tokenizer, alphas_cumprod)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 steps: int = 20, guidance: float = 7.5, sampler: str = DEFAULT_SAMPLER,
                 schedule: str | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, latents: np.ndarray | None = None,
                 rng: np.random.Generator | None = None, on_step: StepCallback | None = None,
                 image: Image.Image | np.ndarray | None = None, strength: float = 0.8,
                 mask: Image.Image | np.ndarray | None = None, mask_blur: float = 0.0,
                 mask_invert: bool = False) -> Result:
        """Generate one image per prompt.

        ``latents``: unit-variance starting noise (batch, channels, height/f, width/f); it is scaled
        by the sampler's initial sigma as diffusers does, so runs compare with diffusers'. Without
        it, noise comes from ``rng`` (or a generator seeded with ``seed``; a fresh seed if None).

        ``image`` (img2img): start from this picture's latent, noised to the sigma where a
        ``strength`` fraction of the steps remains, as diffusers' img2img pipeline does.

        ``mask`` (inpainting, with ``image``): white repaints, black keeps, as diffusers'
        inpainting pipeline (runtime/inpaint.py); ``mask_blur`` pixels of Gaussian blur (A1111),
        ``mask_invert`` swaps the two. An all-black mask has nothing to repaint: the result is the
        image itself, with no model run. ``seed`` may be a list, one per prompt: each image then
        draws all its noise from its own generator, so it matches a single run with that seed.
        """
        started = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise EdgediffError("give one negative prompt per prompt")
        if image is not None:
            image = original = _as_rgb(image)
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
        # An inpainting U-Net takes the latent, the mask and the masked picture's latent.
        conditioned = self._unet_channels() == 2 * m.latent_channels + 1
        if mask is not None and image is None:
            raise EdgediffError("a mask needs the image it applies to (image=..., --image)")
        if (image is not None or conditioned) and "vae_encoder" not in m.graphs:
            raise EdgediffError(f"this model has no vae_encoder graph, which {'inpainting' if conditioned or mask is not None else 'img2img'} "
                                "needs: re-export it with this version of edgediff")
        if mask is not None:
            mask = prepare_mask(mask, original.size, (width, height), m.vae_scale_factor, blur=mask_blur,
                                invert=mask_invert)
            if mask.empty:
                return self._unchanged(image, len(prompts), seed, started)
        elif conditioned:  # txt2img / img2img on an inpainting model: repaint everything (as A1111)
            mask = prepare_mask(np.full((height, width), 255, np.uint8), (width, height), (width, height),
                                m.vae_scale_factor)
        inpaint_start = image is not None and mask is not None and strength == 1.0
        seeds = None
        if rng is None and isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise EdgediffError(f"give one seed per prompt ({len(prompts)}), not {len(seed)}")
            seeds, seed = [int(s) for s in seed], int(seed[0])
            rng = RowGenerators([np.random.default_rng(s) for s in seeds])
        if rng is None:
            seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None and latents is None else seed
            rng = np.random.default_rng(seed)
        timings: dict[str, float] = {}
        guided = guidance > 1.0  # as diffusers: guidance 1 or below means the conditional model alone

        if latents is not None and tuple(np.shape(latents)) != shape:
            raise EdgediffError(f"latents must have shape {shape} for this prompt count and size, "
                                f"not {tuple(np.shape(latents))}")
        # At full strength diffusers' inpainting pipeline starts from noise and, for an inpainting
        # U-Net, never encodes the picture itself.
        need_x0 = image is not None and not (inpaint_start and conditioned)
        if need_x0 or conditioned:
            pixels_in = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
                         if image is not None else np.zeros((1, 3, height, width), np.float32))
            with self._stage("vae_encoder", timings) as vae_encoder:
                def moments(pixels):
                    return vae_encoder.run(sample=np.repeat(pixels, len(prompts), axis=0))
                image_moments = moments(pixels_in) if need_x0 else None
                masked_moments = moments(masked_pixels(pixels_in, mask)) if conditioned else None
        # diffusers samples the posterior first, then draws the starting noise, then the masked
        # picture's posterior: the same order here, from the same generator.
        if need_x0:
            x0 = self._sample_latent(image_moments, rng)
        noise = np.asarray(rng.standard_normal(shape, dtype=np.float32) if latents is None else latents, dtype=np.float32)
        if conditioned:
            masked_latent = self._sample_latent(masked_moments, rng)
        # Sampling happens in sigma space: x = clean latent + sigma * noise.
        if image is not None and not inpaint_start:
            x = x0 + noise * np.float32(plan.sigmas[0])
        else:
            x = noise * np.float32(plan.init_noise_sigma)

        with self._stage("text_encoder", timings) as text_encoder:
            context = encode_prompts(prompts + negatives if guided else prompts, self.tokenizer,
                                     lambda ids: text_encoder.run(input_ids=ids)[0], max_chunks=self._max_chunks())
        cond, uncond = (context[: len(prompts)], context[len(prompts):]) if guided else (context, None)

        with self._stage("unet", timings) as unet:
            def run_unet(x_in, t, ctx):
                if conditioned:
                    repeat = x_in.shape[0] // len(prompts)
                    x_in = np.concatenate([x_in, np.broadcast_to(mask.latent, (x_in.shape[0], 1, *x_in.shape[2:])),
                                           np.concatenate([masked_latent] * repeat)], axis=1)
                return unet.run(sample=x_in, timestep=t, encoder_hidden_states=ctx)[0]

            denoise = make_denoiser(run_unet, plan.timestep, m.prediction_type, cond, uncond, guidance)
            blend = mask is not None and not conditioned
            if blend:
                denoise = keep_known(denoise, mask.latent, x0, noise, float(plan.sigmas[0]))
            def callback(i, sigma, x_i, denoised):
                on_step(i + 1, plan.steps, x_i)

            x = plan.run(denoise, x, rng=rng, on_step=callback if on_step is not None else None)
            if blend:  # the known region ends as the picture's own latent, as diffusers' last step
                x = mask.latent * x + (np.float32(1.0) - mask.latent) * x0
        timings["unet_per_step"] = timings["unet"] / plan.steps

        with self._stage("vae_decoder", timings) as vae_decoder:
            (decoded,) = vae_decoder.run(latent_sample=x / np.float32(m.scaling_factor) + np.float32(m.shift_factor))
        pixels = np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0).astype(np.float32)
        if mask is not None and mask.overlay is not None:  # blurred mask: a soft seam over the picture
            pixels = mask.overlay * pixels + (1.0 - mask.overlay) * (np.asarray(image, np.float32) / 255.0)
        timings["total"] = time.perf_counter() - started
        images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
        return Result(images=images, pixels=pixels, seed=seed, timings=timings, seeds=seeds)

    def _sample_latent(self, moments: list[np.ndarray], rng) -> np.ndarray:
        """A sample of the VAE's latent Gaussian, scaled as the U-Net expects it."""
        mean, std = moments
        posterior = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return (posterior - np.float32(self.manifest.shift_factor)) * np.float32(self.manifest.scaling_factor)

    def _unchanged(self, image: Image.Image, count: int, seed, started: float) -> Result:
        """An empty mask repaints nothing: the picture itself, once per prompt."""
        pixels = np.repeat((np.asarray(image, np.float32) / 255.0)[None], count, axis=0)
        return Result(images=[image.copy() for _ in range(count)], pixels=pixels, seed=seed,
                      timings={"total": time.perf_counter() - started})

    def _unet_channels(self) -> int:
        return next(s for s in self.manifest.graphs["unet"].inputs if s.name == "sample").shape[1]

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

    def _max_chunks(self) -> int | None:
        """Prompt chunks the U-Net takes: None when its context axis is dynamic; exports made before
        long prompts have it fixed at one chunk of 77 tokens."""
        context = next(s for s in self.manifest.graphs["unet"].inputs if s.name == "encoder_hidden_states").shape[1]
        return context // self.tokenizer.max_length if isinstance(context, int) else None

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


class RowGenerators:
    """One generator per image of a batch: row i of every draw comes from generator i, so an image
    in a batch gets the noise a single run with its seed gets (for the samplers' ``rng`` too)."""

    def __init__(self, generators: list[np.random.Generator]):
        self.generators = generators

    def standard_normal(self, shape, dtype=np.float64):
        if shape[0] != len(self.generators):
            raise ValueError(f"draws of {shape[0]} rows from {len(self.generators)} generators")
        return np.stack([g.standard_normal(tuple(shape[1:]), dtype=dtype) for g in self.generators])
