"""Text to image without torch: tokenize, encode, sample, decode. The pipeline only orchestrates."""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from . import arguments as args
from . import memory as mem
from .conditioning import check_size_pair, embeds_guidance, guidance_embedding, size_ids
from .adapters import Adapters
from .denoiser import make_denoiser, noised
from .flow import make_model_plan, skip_guidance, skip_inputs
from .flow import skip_layer_guidance as skip_layer_settings
from .errors import EdgediffError, InputError, ModelFolderError, OutOfMemoryError
from .images import to_rgb
from .manifest import Manifest, read_manifest
from .noise import NOISE_SOURCES, make_rng
from .inpaint import keep_known, masked_pixels, prepare_mask
from .prompts import encode_prompts
from .sessions import GraphSession, Sessions, resolve_provider
from .text_conditioning import encode_text, load_tokenizer, switched_on
from .tokenizer import ClipTokenizer
from .vae_tiling import needs_tiling, tiled_decode, tiled_encode

DEFAULT_SAMPLER = "dpmpp_2m_karras"
StepCallback = Callable[[int, int, np.ndarray], None]  # (step, steps, latents)


@dataclass
class Result:
    images: list[Image.Image]
    pixels: np.ndarray  # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seeds: list[int] | None = None  # one per image when ``seed`` was given as a list
    loras: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) applied
    embeddings: list[str] = field(default_factory=list)  # textual-inversion names available


def _memory_errors(generate):
    """A NumPy allocation that fails becomes one line that says what ran out."""
    @functools.wraps(generate)
    def wrapper(self, *a, **kw):
        try:
            return generate(self, *a, **kw)
        except MemoryError as error:
            raise OutOfMemoryError(f"ran out of memory ({str(error)[:120] or 'MemoryError'}); try a smaller size, "
                                   "fewer prompts at once or --memory low") from None
    return wrapper


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
        self._profiles: dict[str, mem.GraphProfile] = {}  # read on the first memory check
        self._held: dict[str, int] = {}  # activation bytes resident sessions' arenas grew to (estimated)
        self.memory_plan: mem.Estimate | None = None  # what the last memory check accepted
        self.adapters = Adapters(model_dir, manifest, sessions._warn_once)

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
        tokenizers = [load_tokenizer(model_dir, encoder["tokenizer"]) for encoder in manifest.text_encoders]
        try:  # flow-matching models have none ("")
            alphas_cumprod = (np.load(model_dir / manifest.alphas_cumprod, allow_pickle=False).astype(np.float64)
                              if manifest.alphas_cumprod else None)
        except (OSError, ValueError, TypeError) as error:
            raise ModelFolderError(f"cannot read {model_dir / manifest.alphas_cumprod} ({str(error)[:100]}); "
                                   "re-export the model") from None
        sessions = Sessions(model_dir, manifest, provider, memory, warn=warn, threads=threads)
        return cls(model_dir, manifest, sessions, tokenizers, alphas_cumprod)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    @_memory_errors
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 steps: int = 20, guidance: float = 7.5, sampler: str = DEFAULT_SAMPLER,
                 schedule: str | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, latents: np.ndarray | None = None,
                 rng: np.random.Generator | None = None, on_step: StepCallback | None = None,
                 image: Image.Image | np.ndarray | str | Path | None = None, strength: float = 0.8,
                 mask: Image.Image | np.ndarray | str | Path | None = None, mask_blur: float = 0.0,
                 mask_invert: bool = False, noise: str = "numpy", original_size: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), check_memory: bool = True,
                 loras: Sequence[tuple[str | Path, float]] | None = None,
                 embeddings: Sequence[str | Path] | None = None, lora_dir: str | Path | None = None,
                 allow_pickle: bool = False, vae_tiling: bool | None = None, t5: str | None = None,
                 skip_layer_guidance: bool | dict | None = None) -> Result:
        """Generate one image per prompt.

        ``latents``: unit-variance starting noise (batch, channels, height/f, width/f); it is scaled
        by the sampler's initial sigma as diffusers does, so runs compare with diffusers'. Without
        it, noise comes from ``rng`` (or a generator seeded with ``seed``, a whole number in
        [0, 2**64 - 1]; None or any negative seed picks a fresh one, reported as ``result.seed``).
        ``noise``: the generator ``seed`` seeds: ``"numpy"`` (``numpy.random.default_rng``) or
        ``"torch-cpu"`` (``torch.randn`` with ``torch.Generator().manual_seed(seed)``, as diffusers
        and ComfyUI on the CPU draw it; the sampler's noise follows from the same stream).

        ``image`` (img2img): start from this picture's latent, noised to the sigma where a
        ``strength`` fraction of the steps remains, as diffusers' img2img pipeline does.

        ``mask`` (inpainting, with ``image``): white repaints, black keeps, as diffusers'
        inpainting pipeline (runtime/inpaint.py); ``mask_blur`` pixels of Gaussian blur (A1111),
        ``mask_invert`` swaps the two. An all-black mask has nothing to repaint: the result is the
        image itself, with no model run. ``seed`` may be a list, one per prompt: each image then
        draws all its noise from its own generator, so it matches a single run with that seed.
        ``original_size``, ``target_size`` (height, width; default: the output size) and
        ``crops_coords_top_left`` are SDXL's micro-conditioning, used by U-Nets that take size ids.
        ``check_memory``: refuse up front (OutOfMemoryError) a size whose estimated peak memory
        exceeds what the machine has free; False tries anyway. Bad arguments raise InputError.
        ``loras``: [(file, weight)], plus A1111 ``<lora:name:weight>`` tags in the prompt, found in
        ``lora_dir``; ``embeddings``: textual-inversion files, used by name in the prompts (lora.py).
        ``vae_tiling``: decode (and encode) the VAE in overlapping tiles (runtime/vae_tiling.py) so its
        activations stay those of one tile; None tiles above the size the manifest states.
        ``t5``: "on" or "off" for models with an optional T5 encoder (SD 3/3.5; None: on where the
        export has it); off feeds zeros in its place, as diffusers does without ``text_encoder_3``.
        ``skip_layer_guidance``: True runs the manifest's recommended skip-layer guidance (SD 3.5
        Medium's layers 7-9), a dict overrides its ``layers``, ``scale``, ``start``, ``stop``;
        None/False: off, as diffusers' default (runtime/flow.py).
        """
        started = time.perf_counter()
        prompts = args.prompt_list(prompt, "prompt")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            args.prompt_list(negative_prompt, "negative_prompt")
        args.prompt_list(negatives, "negative_prompt")
        if not prompts:
            raise InputError("give at least one prompt")
        if len(negatives) != len(prompts):
            raise InputError("give one negative prompt per prompt")
        steps = args.check_steps(steps, int(self.manifest.scheduler.get("num_train_timesteps") or 1000))
        guidance = args.check_guidance(guidance)
        args.check_name(sampler, "sampler"), args.check_name(schedule, "schedule")
        text_rule = self.manifest.conditioning.get("text", {})
        running = switched_on(text_rule, self.manifest.text_encoders, t5=t5)
        unet_inputs = {spec.name: spec for spec in self.manifest.graphs["unet"].inputs}
        slg = skip_layer_settings(skip_layer_guidance, self.manifest.conditioning.get("skip_layer_guidance", {}),
                                  unet_inputs["skip_layers"].shape[1] if "skip_layers" in unet_inputs else 0)
        adapt_started = time.perf_counter()
        adapted = self.adapters.apply(self.sessions, self.tokenizers, prompts, loras, embeddings, lora_dir,
                                      allow_pickle)
        prompts, adapt_seconds = adapted.prompts, time.perf_counter() - adapt_started
        if image is not None:
            image = original = to_rgb(image)
            width = image.width if width is None else width
            height = image.height if height is None else height
        width, height = self._check_size(width, height)
        tile = self._tiling(vae_tiling, width, height)
        if image is not None and image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)  # as diffusers' image processor
        if noise not in NOISE_SOURCES:
            raise InputError(f"unknown noise source {noise!r}; expected one of {', '.join(NOISE_SOURCES)}")
        m = self.manifest
        plan = make_model_plan(m, self.alphas_cumprod, sampler, steps, schedule=schedule,
                               strength=strength if image is not None else 1.0,
                               latent_size=(height // m.vae_scale_factor, width // m.vae_scale_factor))
        shape = (len(prompts), m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        # An inpainting U-Net takes the latent, the mask and the masked picture's latent.
        conditioned = self._unet_channels() == 2 * m.latent_channels + 1
        if mask is not None and image is None:
            raise EdgediffError("a mask needs the image it applies to (image=..., --image)")
        if mask is not None and m.prediction_type == "flow":
            raise InputError("inpainting is not available for flow-matching models (SD 3/3.5) yet")
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
            rng = RowGenerators([make_rng(noise, args.resolve_seed(s)) for s in seeds])
        if rng is None:
            seed = args.resolve_seed(seed) if seed is not None or latents is None else None
            rng = make_rng(noise, seed)
        timings: dict[str, float] = {"adapters": adapt_seconds} if loras or embeddings or adapted.loras else {}
        # As diffusers: guidance 1 or below means the conditional model alone, and a U-Net that
        # embeds the guidance scale (LCM) runs once per step with it.
        guided = guidance > 1.0 and not embeds_guidance(unet_inputs)
        self.sessions.without_arena = frozenset()  # unless the memory check needs them off
        if check_memory:
            tile = self.check_memory(len(prompts), width, height, guided=guided, img2img=image is not None,
                                     vae_tiling=vae_tiling)

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
                    pixels = np.repeat(pixels, len(prompts), axis=0)
                    if not tile:
                        return vae_encoder.run(sample=pixels)
                    t = self._tile_plan(width, height)
                    return list(tiled_encode(lambda part: tuple(vae_encoder.run(sample=part)), pixels,
                                             t["tile_pixels"], t["tile_latent"], t["overlap"]))
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
            x = noised(x0, noise, plan.sigmas[0], m.prediction_type)
        else:
            x = noise * np.float32(plan.init_noise_sigma)

        context = self._encode_text(prompts + negatives if guided else prompts, timings, running)
        context.update(skip_inputs(unet_inputs, len(context["encoder_hidden_states"])))
        if guided and m.conditioning.get("force_zeros_for_empty_prompt"):
            for row, negative in enumerate(negatives, len(prompts)):  # as diffusers without a negative prompt
                if not negative:
                    for value in context.values():
                        value[row] = 0.0
        n = len(prompts)
        if "time_ids" in unet_inputs:
            own = (height, width)
            context["time_ids"] = size_ids(
                m.conditioning.get("time_ids", ()), original_size=check_size_pair("original_size", original_size or own),
                target_size=check_size_pair("target_size", target_size or own),
                crops_coords_top_left=check_size_pair("crops_coords_top_left", crops_coords_top_left),
                batch=len(context["encoder_hidden_states"]))
        if "timestep_cond" in unet_inputs:
            context["timestep_cond"] = guidance_embedding(guidance, unet_inputs["timestep_cond"].shape[1], n)
        context = {name: value for name, value in context.items() if name in unet_inputs}
        cond = {name: value[:n] for name, value in context.items()}
        uncond = {name: value[n:] for name, value in context.items()} if guided else None

        with self._stage("unet", timings) as unet:
            def run_unet(x_in, t, ctx):
                if conditioned:
                    repeat = x_in.shape[0] // n
                    x_in = np.concatenate([x_in, np.broadcast_to(mask.latent, (x_in.shape[0], 1, *x_in.shape[2:])),
                                           np.concatenate([masked_latent] * repeat)], axis=1)
                return unet.run(sample=x_in, timestep=t, **ctx)[0]

            # Low memory runs the guidance halves one after the other: the U-Net's activations are
            # the peak of a generation once only one graph is resident.
            denoise = make_denoiser(run_unet, plan.timestep, m.prediction_type, cond, uncond, guidance,
                                    split=self.sessions.memory == "low",
                                    skip=skip_guidance(slg, plan, cond) if slg and guided else None)
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
            pixels = self._to_pixels(vae_decoder, x, tile)
        if mask is not None and mask.overlay is not None:  # blurred mask: a soft seam over the picture
            pixels = mask.overlay * pixels + (1.0 - mask.overlay) * (np.asarray(image, np.float32) / 255.0)
        timings["total"] = time.perf_counter() - started
        images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
        return Result(images=images, pixels=pixels, seed=seed, timings=timings, seeds=seeds,
                      loras=adapted.loras, embeddings=adapted.embeddings)

    def decode(self, latents: np.ndarray, *, vae_tiling: bool | None = None) -> tuple[list[Image.Image], np.ndarray]:
        """(images, float pixels) for latents in sampler space, such as the ``latents`` an
        ``on_step`` callback sees (the state at the start of that step): what an interrupted
        run had reached. ``vae_tiling`` as for ``__call__``."""
        latents = np.asarray(latents, dtype=np.float32)
        f = self.manifest.vae_scale_factor
        tile = self._tiling(vae_tiling, latents.shape[-1] * f, latents.shape[-2] * f) if latents.ndim == 4 else False
        with self.sessions.use("vae_decoder") as vae_decoder:
            pixels = self._to_pixels(vae_decoder, latents, tile)
        return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels], pixels

    def _to_pixels(self, vae_decoder: GraphSession, x: np.ndarray, tile: bool = False) -> np.ndarray:
        """Sampler-space latents -> float32 pixels (batch, height, width, 3) in [0, 1]."""
        m = self.manifest
        z = x / np.float32(m.scaling_factor) + np.float32(m.shift_factor)
        if tile:
            t = self._tile_plan(x.shape[-1] * m.vae_scale_factor, x.shape[-2] * m.vae_scale_factor)
            decoded = tiled_decode(lambda part: vae_decoder.run(latent_sample=part)[0], z, t["tile_latent"],
                                   t["tile_pixels"], t["overlap"])
        else:
            (decoded,) = vae_decoder.run(latent_sample=z)
        return np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0).astype(np.float32)

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
        # A manifest without a "sample" input is caught where the U-Net session starts.
        return next((s.shape[1] for s in self.manifest.graphs["unet"].inputs if s.name == "sample"),
                    self.manifest.latent_channels)

    def _encode_text(self, texts: list[str], timings: dict[str, float],
                     running: list[str] | None = None) -> dict[str, np.ndarray]:
        """Each text encoder's per-token states (A1111 prompt syntax, chunks of 75 tokens), concatenated
        along the features as the U-Net takes them, and the pooled embedding where an encoder gives
        one (SDXL's second; taken from each prompt's first chunk, as A1111 does). A manifest with a
        ``conditioning.text`` layout (SD 3/3.5) combines the ``running`` encoders as it says."""
        rule = self.manifest.conditioning.get("text")
        if rule:
            return encode_text(rule, self.manifest.text_encoders, self.tokenizers, texts,
                               lambda graph: self._stage(graph, timings), running)
        hidden, context = [], {}
        for encoder, tokenizer in zip(self.manifest.text_encoders, self.tokenizers):
            extra: dict[str, np.ndarray] = {}
            with self._stage(encoder["graph"], timings) as session:
                def run(ids, session=session, extra=extra):
                    outputs = session.run(input_ids=ids)
                    for spec, value in zip(session.entry.outputs[1:], outputs[1:]):
                        extra[spec.name] = value
                    return outputs[0]

                hidden.append(encode_prompts(texts, tokenizer, run, max_chunks=self._max_chunks()))
            chunks = len(next(iter(extra.values()), ())) // max(len(texts), 1)
            context.update({name: value[::chunks] for name, value in extra.items()})
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

    def _max_chunks(self) -> int | None:
        """Prompt chunks the U-Net takes: None when its context axis is dynamic; exports made before
        long prompts have it fixed at one chunk of 77 tokens."""
        context = next((s.shape[1] for s in self.manifest.graphs["unet"].inputs
                        if s.name == "encoder_hidden_states" and len(s.shape) == 3), None)
        return context // self.tokenizer.max_length if isinstance(context, int) else None

    def _tiling(self, vae_tiling: bool | None, width: int, height: int) -> bool:
        """Whether the VAE runs in tiles: forced on or off, or automatic (None) per the manifest."""
        if vae_tiling is not None and not isinstance(vae_tiling, (bool, np.bool_)):
            raise InputError(f"vae_tiling must be True, False or None, not {vae_tiling!r}")
        t = self.manifest.vae_tiling
        if vae_tiling is None:
            return needs_tiling(height, width, t["tile_pixels"], t["auto_above_pixels"])
        return bool(vae_tiling)

    def _tile_plan(self, width: int, height: int) -> dict:
        """The manifest's tiles, halved while one would cover the whole image: a forced tiling then
        still tiles (an SDXL VAE's 1024-pixel tile would decode 1024x1024 whole)."""
        t = dict(self.manifest.vae_tiling)
        while not needs_tiling(height, width, t["tile_pixels"], None) and t["tile_latent"] >= 32:
            t["tile_pixels"] //= 2
            t["tile_latent"] //= 2
        return t

    def _check_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        multiple = self.manifest.size_multiple
        return tuple(args.check_side(label, self.manifest.default_size if value is None else value, multiple)
                     for label, value in (("width", width), ("height", height)))

    def estimate_memory(self, batch: int, width: int, height: int, *, guided: bool = True,
                        img2img: bool = False, vae_tiling: bool | None = None, arena: bool = True) -> mem.Estimate:
        """Estimated peak memory (bytes, whole process) of one generation at this size; a tiled VAE
        (``vae_tiling`` as for ``__call__``) runs at the size of one tile. ``arena=False``: the
        graphs with a score matrix of ``memory.ARENA_SCRATCH_LIMIT`` or more run without ONNX
        Runtime's CPU arena, as ``check_memory`` decides when the arena would not fit."""
        stages, context = self._stages(batch, width, height, guided, img2img, vae_tiling)
        without = frozenset() if arena else mem.scratch_heavy(self._profiles, stages, context)
        found = mem.estimate(self._profiles, stages, self.sessions.memory, self.sessions.resident,
                             mem.resident_bytes(), context, self._held, without)
        found.without_arena = without
        return found

    def _stages(self, batch: int, width: int, height: int, guided: bool, img2img: bool,
                vae_tiling: bool | None) -> tuple[list[tuple[str, int, int, int]], int]:
        """The graphs one generation runs, in order, at their input sizes; and the context length."""
        m = self.manifest
        if not self._profiles:
            self._profiles = {name: mem.load_profile(self.model_dir, name, entry) for name, entry in m.graphs.items()}
        f = m.vae_scale_factor
        tile = self._tile_plan(width, height)["tile_pixels"]
        vae_h, vae_w = (min(height, tile), min(width, tile)) if self._tiling(vae_tiling, width, height) else (height, width)
        stages = [("text_encoder", 2 * batch if guided else batch, 0, 0)]
        if img2img:
            stages.append(("vae_encoder", batch, vae_h, vae_w))
        split = self.sessions.memory == "low"  # the guidance halves run one at a time (make_denoiser)
        stages += [("unet", 2 * batch if guided and not split else batch, height // f, width // f),
                   ("vae_decoder", batch, vae_h // f, vae_w // f)]
        context = next((s.shape[1] for s in m.graphs["unet"].inputs if len(s.shape) == 3 and isinstance(s.shape[1], int)),
                       m.tokenizer["max_length"])
        return stages, context

    def _hold(self, need: mem.Estimate) -> None:
        """Run as ``need`` plans: its graphs without the arena, and in high memory book what the
        resident sessions' arenas grow to."""
        self.sessions.without_arena = need.without_arena
        self.memory_plan = need
        if self.sessions.memory == "high":
            for graph, size in need.activations.items():
                self._held[graph] = max(size, self._held.get(graph, 0) if graph in self.sessions.resident else 0)

    def check_memory(self, batch: int, width: int, height: int, *, guided: bool = True, img2img: bool = False,
                     vae_tiling: bool | None = None) -> bool:
        """OutOfMemoryError when the estimate exceeds the memory available (not checked on GPUs).
        Returns whether the VAE runs in tiles: with ``vae_tiling=None`` also when only a tiled VAE fits."""
        tile = self._tiling(vae_tiling, width, height)
        if self.sessions.provider != "cpu":
            return tile  # the activations live in GPU memory, which this process cannot see cheaply
        available, source = mem.available_bytes()
        if available is None:
            return tile
        def fits(plan: mem.Estimate, share: float = 1.0) -> bool:
            return plan.peak_bytes - mem.resident_bytes() <= share * available

        need = self.estimate_memory(batch, width, height, guided=guided, img2img=img2img, vae_tiling=tile)
        if fits(need, mem.ARENA_SHARE):
            self._hold(need)
            return tile
        lean = self.estimate_memory(batch, width, height, guided=guided, img2img=img2img, vae_tiling=tile,
                                    arena=False)
        if fits(lean):  # (the same plan as ``need`` where no graph has a score matrix that large)
            self._hold(lean)
            return tile
        need = lean  # the smallest plan at this size, for the message
        if vae_tiling is None and not tile and need.stage.startswith("vae"):
            tiled = self.estimate_memory(batch, width, height, guided=guided, img2img=img2img, vae_tiling=True,
                                         arena=False)
            if fits(tiled):
                self._hold(tiled)
                return True
        scale = 1.0
        multiple = self.manifest.size_multiple
        while scale > 0.05:
            scale *= 0.9
            w, h = (max(multiple, int(side * scale) // multiple * multiple) for side in (width, height))
            if fits(self.estimate_memory(batch, w, h, guided=guided, img2img=img2img, vae_tiling=tile, arena=False)):
                break
        tiles = need.stage.startswith("vae") and not tile
        raise OutOfMemoryError(
            f"a {width}x{height} generation needs about {need} but {available / mem.GB:.1f} GB is free "
            f"({source}); try {'--vae-tiling (vae_tiling=True), or ' if tiles else ''}a smaller size such as "
            f"{w}x{h}, or turn the check off (--no-memory-check, check_memory=False) if you know better")


class RowGenerators:
    """One generator per image of a batch: row i of every draw comes from generator i, so an image
    in a batch gets the noise a single run with its seed gets (for the samplers' ``rng`` too)."""

    def __init__(self, generators: list[np.random.Generator]):
        self.generators = generators

    def standard_normal(self, shape, dtype=np.float64):
        if shape[0] != len(self.generators):
            raise ValueError(f"draws of {shape[0]} rows from {len(self.generators)} generators")
        return np.stack([g.standard_normal(tuple(shape[1:]), dtype=dtype) for g in self.generators])
