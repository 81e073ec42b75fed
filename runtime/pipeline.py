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
from . import hires as hires_fix
from . import controlnet
from . import memory as mem
from .adapters import Adapters
from .conditioning import embeds_guidance, guidance_embedding, size_ids
from .denoiser import make_denoiser
from .flow import make_model_plan, skip_guidance, skip_inputs
from .errors import InputError, ModelFolderError, OutOfMemoryError
from .manifest import Manifest, read_manifest
from .modes import Img2Img, Txt2Img, choose_mode, unet_kind
from .noise import make_rng
from .prompts import encode_prompts
from .request import (DEFAULT_SAMPLER, REQUEST_FIELDS, GenerationRequest, StepCallback, check_vae_tiling,
                      default_model_dir, skip_layers, text_encoders)
from .samplers import SamplerPlan
from .sessions import GraphSession, Sessions
from .text_conditioning import encode_text, load_tokenizer
from .tokenizer import ClipTokenizer
from .vae_tiling import tiled_decode, tiled_encode



@dataclass
class Result:
    images: list[Image.Image]
    pixels: np.ndarray  # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seeds: list[int] | None = None  # one per image when ``seed`` was given as a list
    loras: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) applied
    embeddings: list[str] = field(default_factory=list)  # textual-inversion names available
    request: GenerationRequest | None = None  # the checked request that made it (metadata.result_infotext)
    lora_files: list[tuple[str, float, Path]] = field(default_factory=list)  # (name, weight, file) applied
    latents: np.ndarray | None = None  # the last latent, in sampler space (the hires fix upscales it)


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
        self.planner = mem.MemoryPlanner(model_dir, manifest, sessions.memory)
        self.memory_plan: mem.Estimate | None = None  # what the last memory check accepted
        self.adapters = Adapters(model_dir, manifest, sessions._warn_once)
        self.controlnets = controlnet.ControlNets(
            lambda folder, entry, optimized_for, name=controlnet.GRAPH: GraphSession(
                name, folder, entry, sessions.provider, optimized_for, sessions._warn_once,
                threads=sessions.threads), sessions.memory)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, provider: str = "auto", memory: str = "high",
             warn: Callable[[str], None] | None = None, threads: int | None = None) -> "Pipeline":
        """Open an exported model folder (the shipped default model when ``model_dir`` is None).

        ``memory="low"`` loads one graph at a time and releases it after its stage; ``"high"``
        keeps every graph resident after first use (faster for repeated generations).
        ``threads``: ONNX Runtime's intra-op threads (default: one per core).
        """
        model_dir = Path(default_model_dir(provider) if model_dir is None else model_dir)
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

    # Over ~60 lines only by its signature (pipe(...)'s public keywords, one per field of
    # GenerationRequest); the body builds the request and calls generate.
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
                 allow_pickle: bool = False, vae_tiling: bool | None = None, prompt_syntax: str = "a1111",
                 control: Sequence[controlnet.ControlUnit | dict] | None = None,
                 t5: str | None = None, skip_layer_guidance: bool | dict | None = None,
                 hires: dict | None = None, image_guidance: float | None = None,
                 noise_level: int | None = None) -> Result:
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
        ``prompt_syntax``: ``"a1111"`` (emphasis weights, ``BREAK``, chunks of 75 tokens) or
        ``"plain"`` (the prompt read literally and cut at the encoder's length, as diffusers does).
        ``hires``: A1111's hires fix (runtime/hires.py), e.g. ``{"scale": 2.0, "steps": 10,
        "strength": 0.5, "upscaler": "latent"}``: this size first, upscaled, then img2img at the
        upscaled size (``width``/``height`` in it instead of ``scale``: that size).
        ``image_guidance`` (InstructPix2Pix models, with ``image``; default 1.5): how closely the edit
        keeps to the picture; ``guidance`` is then the instruction's weight (runtime/modes.py).
        ``noise_level`` (x4 upscaler models, with ``image``; default 20, up to the model's
        ``max_noise_level``): how much noise the picture gets before the U-Net sees it; the output is
        4x the picture (``width``/``height``: the output size), runtime/upscale.py.
        ``control``: ControlNet units (dicts or ``ControlUnit``: model, image, scale, start, end,
        guess_mode, preprocess), runtime/controlnet.py.
        ``t5``: "on" or "off" for models with an optional T5 encoder (SD 3/3.5; None: on where the
        export has it); off feeds zeros in its place, as diffusers does without ``text_encoder_3``.
        ``skip_layer_guidance``: True runs the manifest's recommended skip-layer guidance (SD 3.5
        Medium's layers 7-9), a dict overrides its ``layers``, ``scale``, ``start``, ``stop``;
        None/False: off, as diffusers' default (runtime/flow.py).
        """
        values = locals()
        return self.generate(GenerationRequest(**{name: values[name] for name in REQUEST_FIELDS}))

    @_memory_errors
    def generate(self, request: GenerationRequest) -> Result:
        """One generation, as the table of contents of runtime/modes.py's stages."""
        started = time.perf_counter()
        request = request.check(self.manifest)                                # 1. check the request
        if request.hires is not None:  # two generations: this size, then img2img upscaled
            return hires_fix.generate(self, request)
        prompts, adapters, timings = self._adapt(request)                     # 2. LoRAs, embeddings
        mode = choose_mode(request, self.manifest, self._unet_channels())     # 3. the mode
        if mode is None:  # an all-black mask repaints nothing
            return self._unchanged(request, len(prompts), started)
        run = self._prepare(request, prompts, timings, mode.takes_strength)   # 4. plan, noise, guidance
        control = self._control(request, run)                                 #    ControlNet units, checked
        tile, arena = self._plan_memory(request, mode, run, control)          # 5. the memory plan
        with self._stage("vae_encoder", timings, arena, mode.encodes) as vae_encoder:
            mode.encode(self._vae_encoder(vae_encoder, run.batch, request, tile))  # 6. encode the picture
        x = mode.start(run.draw, run.sample_latent, run.plan)                 # 7. the starting latent
        context = self._context(request, prompts, run, timings, arena)        # 8. encode the text
        x = self._sample(mode, run, x, context, timings, arena, request.on_step, control)   # 9. sample
        with self._stage("vae_decoder", timings, arena) as vae_decoder:       # 10. decode
            pixels = mode.finish_pixels(self._to_pixels(vae_decoder, x, tile))
        timings["total"] = time.perf_counter() - started
        images = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
        return Result(images=images, pixels=pixels, seed=run.seed, timings=timings, seeds=run.seeds,
                      loras=adapters.loras, embeddings=adapters.embeddings, request=request,
                      lora_files=adapters.lora_files, latents=x)

    def _adapt(self, request: GenerationRequest):
        """Apply the request's LoRAs and embeddings; the prompts without their <lora:> tags."""
        started = time.perf_counter()
        adapted = self.adapters.apply(self.sessions, self.tokenizers, request.prompt, request.loras,
                                      request.embeddings, request.lora_dir, request.allow_pickle)
        used = request.loras or request.embeddings or adapted.loras
        return adapted.prompts, adapted, {"adapters": time.perf_counter() - started} if used else {}

    def _prepare(self, request: GenerationRequest, prompts: list[str], timings: dict[str, float],
                 takes_strength: bool = True) -> "Run":
        """The sampler plan, the generators the seeds seed, and whether guidance runs the U-Net twice."""
        m, r = self.manifest, request
        shape = (len(prompts), m.latent_channels, r.height // m.vae_scale_factor, r.width // m.vae_scale_factor)
        plan = make_model_plan(m, self.alphas_cumprod, r.sampler, r.steps, schedule=r.schedule,
                               strength=r.strength if takes_strength and (r.image is not None or r.start_latent is not None)
                               else 1.0, latent_size=shape[2:])
        rng, seed, seeds = r.rng, r.seed, None
        if rng is None and isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise InputError(f"give one seed per prompt ({len(prompts)}), not {len(seed)}")
            seeds, seed = [int(s) for s in seed], int(seed[0])
            rng = RowGenerators([make_rng(r.noise, args.resolve_seed(s)) for s in seeds])
        if rng is None:
            seed = args.resolve_seed(seed) if seed is not None or r.latents is None else None
            rng = make_rng(r.noise, seed)
        if r.start_latent is not None and tuple(np.shape(r.start_latent)) != shape:
            raise InputError(f"start_latent must have shape {shape}, not {tuple(np.shape(r.start_latent))}")
        if r.latents is not None and tuple(np.shape(r.latents)) != shape:
            raise InputError(f"latents must have shape {shape} for this prompt count and size, "
                             f"not {tuple(np.shape(r.latents))}")
        unet_inputs = {spec.name: spec for spec in m.graphs["unet"].inputs}
        # As diffusers: guidance 1 or below means the conditional model alone, and a U-Net that
        # embeds the guidance scale (LCM) runs once per step with it.
        guided = r.guidance > 1.0 and not embeds_guidance(unet_inputs)
        return Run(plan, shape, rng, seed, seeds, guided, unet_inputs, r.latents, self._latent_sample, r.guidance,
                   text_encoders(m, r.t5), skip_layers(m, r.skip_layer_guidance))

    def _plan_memory(self, request: GenerationRequest, mode, run: "Run", control=None) -> tuple[bool, frozenset[str]]:
        """(whether the VAE runs in tiles, the graphs that run without the CPU arena)."""
        tile = mem.tiling(self.manifest, request.vae_tiling, request.width, request.height)
        if not request.check_memory or self.sessions.provider != "cpu":
            return tile, frozenset()  # on GPUs the activations live in memory this process cannot see cheaply
        shape = self._shape(run.batch, request.width, request.height, run.guided, mode, request.vae_tiling,
                            [unit.model for unit in control.units] if control else ())
        tile, need = self.planner.check(shape, self._resident(shape))
        if need is not None:
            self.memory_plan = need
        return tile, need.without_arena if need is not None else frozenset()

    def _vae_encoder(self, session: GraphSession | None, batch: int, request: GenerationRequest, tile: bool):
        """``encode(pixels (1, 3, h, w)) -> moments`` for the whole batch, tiled when the VAE is."""
        def encode(pixels: np.ndarray):
            pixels = np.repeat(pixels, batch, axis=0)
            if not tile:
                return session.run(sample=pixels)
            t = self._tile_plan(request.width, request.height)
            return list(tiled_encode(lambda part: tuple(session.run(sample=part)), pixels,
                                     t["tile_pixels"], t["tile_latent"], t["overlap"]))
        return encode

    def _context(self, request: GenerationRequest, prompts: list[str], run: "Run", timings, arena) -> tuple[dict, dict]:
        """The U-Net's conditioning: (cond, uncond) by input name; uncond None without guidance."""
        m, n, negatives = self.manifest, len(prompts), request.negatives
        context = self._encode_text(prompts + negatives if run.guided else prompts, timings,
                                    request.prompt_syntax, arena, run.text_encoders)
        context.update(skip_inputs(run.unet_inputs, len(context["encoder_hidden_states"])))
        if run.guided and m.conditioning.get("force_zeros_for_empty_prompt"):
            for row, negative in enumerate(negatives, n):  # as diffusers without a negative prompt
                if not negative:
                    for value in context.values():
                        value[row] = 0.0
        if "time_ids" in run.unet_inputs:
            own = (request.height, request.width)
            context["time_ids"] = size_ids(
                m.conditioning.get("time_ids", ()), original_size=request.original_size or own,
                target_size=request.target_size or own, crops_coords_top_left=request.crops_coords_top_left,
                batch=len(context["encoder_hidden_states"]))
        if "timestep_cond" in run.unet_inputs:
            context["timestep_cond"] = guidance_embedding(request.guidance, run.unet_inputs["timestep_cond"].shape[1], n)
        context = {name: value for name, value in context.items() if name in run.unet_inputs}
        cond = {name: value[:n] for name, value in context.items()}
        return cond, ({name: value[n:] for name, value in context.items()} if run.guided else None)

    def _control(self, request: GenerationRequest, run: "Run"):
        """The request's ControlNet units as a U-Net input provider (None without any)."""
        if not request.control:
            return None
        prepared = controlnet.prepare(request.control, self.controlnets, self.manifest, request.width,
                                      request.height, self.sessions.provider)
        return controlnet.Control([unit for unit, _, _ in prepared], [manifest for _, manifest, _ in prepared],
                                  [hint for _, _, hint in prepared], run.plan.timesteps, self.controlnets)

    def _sample(self, mode, run: "Run", x: np.ndarray, context, timings, arena, on_step, control=None) -> np.ndarray:
        """The sampler's loop over the U-Net, with the mode's extra inputs and steering; ControlNet
        units first, on the latent before a mode adds its channels."""
        cond, uncond, groups = mode.condition(*context)
        providers = (control.bind(cond, uncond), *mode.providers) if control else mode.providers
        with self._stage("unet", timings, arena) as unet, self.controlnets.resident():
            def run_unet(x_in, t, ctx):
                feed = {"sample": x_in, "timestep": t, **ctx}
                for provider in providers:
                    feed = provider(feed)
                return unet.run(**feed)[0]

            # Low memory runs the guidance halves one after the other: the U-Net's activations are
            # the peak of a generation once only one graph is resident.
            skip = skip_guidance(run.skip_layers, run.plan, cond) if run.skip_layers and run.guided else None
            denoise = make_denoiser(run_unet, run.plan.timestep, self.manifest.prediction_type, cond, uncond,
                                    run.guidance, split=self.sessions.memory == "low", skip=skip, **groups)
            callback = None if on_step is None else \
                (lambda i, sigma, x_i, denoised: on_step(i + 1, run.plan.steps, x_i))
            x = run.plan.run(mode.steer(denoise, run.plan), x, rng=run.rng, on_step=callback)
        timings["unet_per_step"] = timings["unet"] / run.plan.steps
        if control:
            timings["controlnet"] = control.seconds  # inside the unet stage's time
        return mode.finish_latent(x)

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

    def _latent_sample(self, moments: list[np.ndarray], rng) -> np.ndarray:
        """A sample of the VAE's latent Gaussian, scaled as the U-Net expects it."""
        mean, std = moments
        posterior = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return (posterior - np.float32(self.manifest.shift_factor)) * np.float32(self.manifest.scaling_factor)

    def _unchanged(self, request: GenerationRequest, count: int, started: float) -> Result:
        """An empty mask repaints nothing: the picture itself, once per prompt."""
        image = request.image
        seeds = [int(s) for s in request.seed] if isinstance(request.seed, (list, tuple)) else None
        pixels = np.repeat((np.asarray(image, np.float32) / 255.0)[None], count, axis=0)
        return Result(images=[image.copy() for _ in range(count)], pixels=pixels,
                      seed=seeds[0] if seeds else request.seed, seeds=seeds,
                      timings={"total": time.perf_counter() - started}, request=request)

    @property
    def unet_kind(self) -> str:
        """"inpainting", "instruct-pix2pix" or "plain": what the U-Net's declared inputs take
        (front ends use it to drop A1111 fields that do not apply, as A1111 does)."""
        return unet_kind(self._unet_channels(), self.manifest.latent_channels)

    def _unet_channels(self) -> int:
        # A manifest without a "sample" input is caught where the U-Net session starts.
        return next((s.shape[1] for s in self.manifest.graphs["unet"].inputs if s.name == "sample"),
                    self.manifest.latent_channels)

    def _encode_text(self, texts: list[str], timings: dict[str, float], syntax: str = "a1111",
                     arena: frozenset[str] = frozenset(), running: list[str] | None = None) -> dict[str, np.ndarray]:
        """Each text encoder's per-token states (runtime/prompts.py: A1111's syntax in chunks of 75
        tokens, or the plain text cut at one chunk), concatenated along the features as the U-Net
        takes them, and the pooled embedding where an encoder gives one (SDXL's second; taken from
        each prompt's first chunk, as A1111 does). A manifest with a ``conditioning.text`` layout
        (SD 3/3.5) combines the ``running`` encoders as it says (runtime/text_conditioning.py)."""
        rule = self.manifest.conditioning.get("text")
        if rule:
            return encode_text(rule, self.manifest.text_encoders, self.tokenizers, texts,
                               lambda graph: self._stage(graph, timings, arena), running, syntax)
        hidden, context = [], {}
        for encoder, tokenizer in zip(self.manifest.text_encoders, self.tokenizers):
            extra: dict[str, np.ndarray] = {}
            with self._stage(encoder["graph"], timings, arena) as session:
                def run(ids, session=session, extra=extra):
                    outputs = session.run(input_ids=ids)
                    for spec, value in zip(session.entry.outputs[1:], outputs[1:]):
                        extra[spec.name] = value
                    return outputs[0]

                hidden.append(encode_prompts(texts, tokenizer, run, max_chunks=self._max_chunks(), syntax=syntax))
            chunks = len(next(iter(extra.values()), ())) // max(len(texts), 1)
            context.update({name: value[::chunks] for name, value in extra.items()})
        context["encoder_hidden_states"] = np.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        return context

    @contextmanager
    def _stage(self, graph: str, timings: dict[str, float], without_arena: frozenset[str] = frozenset(),
               runs: bool = True) -> Iterator[GraphSession | None]:
        """Time one stage (nothing when it ``runs`` not); session creation is reported apart, as
        ``load_<graph>``. Graphs in ``without_arena`` run without the CPU arena (the memory plan)."""
        if not runs:
            yield None
            return
        started = time.perf_counter()
        loaded_before = self.sessions.load_seconds.get(graph, 0.0)
        with self.sessions.use(graph, arena=graph not in without_arena) as session:
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
        check_vae_tiling(vae_tiling)
        return mem.tiling(self.manifest, vae_tiling, width, height)

    def _tile_plan(self, width: int, height: int) -> dict:
        return mem.tile_plan(self.manifest, width, height)

    def _shape(self, batch: int, width: int, height: int, guided: bool, mode, vae_tiling,
               controlnets=()) -> mem.Shape:
        """``controlnets``: the ControlNet folders a generation runs (one graph each)."""
        encoders = [encoder["graph"] for encoder in self.manifest.text_encoders]
        folders = list(dict.fromkeys(Path(folder) for folder in controlnets))
        nets = tuple((f"controlnet {index}", folder, self.controlnets.manifest(folder).graphs[controlnet.GRAPH])
                     for index, folder in enumerate(folders))
        return mem.Shape(batch, width, height, guided, mode.graphs(encoders), vae_tiling, nets,
                         groups=mode.guidance_groups(guided) if hasattr(mode, "guidance_groups") else 0,
                         latent_tile=getattr(mode, "latent_tile", None))

    def _resident(self, shape: mem.Shape) -> set[str]:
        """The graphs already loaded: the model's, and ControlNets kept open (memory="high")."""
        open_nets = {name for name, folder, _ in shape.controlnets if folder.resolve() in self.controlnets._cache}
        return self.sessions.resident | open_nets

    def estimate_memory(self, batch: int, width: int, height: int, *, guided: bool = True,
                        img2img: bool = False, vae_tiling: bool | None = None, arena: bool = True,
                        control=None) -> mem.Estimate:
        """Estimated peak memory (bytes, whole process) of one generation at this size; a tiled VAE
        (``vae_tiling`` as for ``__call__``) runs at the size of one tile. ``arena=False``: the
        graphs with a score matrix of ``memory.ARENA_SCRATCH_LIMIT`` or more run without ONNX
        Runtime's CPU arena, as ``check_memory`` decides when the arena would not fit.
        ``control``: ControlNet units as for ``__call__`` (their graphs stay loaded beside the U-Net)."""
        tile = self._tiling(vae_tiling, width, height)
        folders = [unit.model for unit in controlnet.control_units(control)]
        shape = self._shape(batch, width, height, guided, self._mode_for(img2img), tile, folders)
        return self.planner.estimate(shape, self._resident(shape), arena)

    def check_memory(self, batch: int, width: int, height: int, *, guided: bool = True, img2img: bool = False,
                     vae_tiling: bool | None = None) -> bool:
        """OutOfMemoryError when the estimate exceeds the memory available (not checked on GPUs).
        Returns whether the VAE runs in tiles: with ``vae_tiling=None`` also when only a tiled VAE fits."""
        tile = self._tiling(vae_tiling, width, height)
        if self.sessions.provider != "cpu":
            return tile
        shape = self._shape(batch, width, height, guided, self._mode_for(img2img), vae_tiling)
        tile, need = self.planner.check(shape, self.sessions.resident)
        self.memory_plan = need or self.memory_plan
        return tile

    def _mode_for(self, img2img: bool):
        """The stage list of a generation with (or without) a picture, for the public estimates."""
        inpainting_unet = self._unet_channels() == 2 * self.manifest.latent_channels + 1
        return Img2Img(None) if img2img or inpainting_unet else Txt2Img()


@dataclass
class Run:
    """What a generation carries from its plan to its last step."""

    plan: SamplerPlan
    shape: tuple[int, int, int, int]  # the latent (batch, channels, height/f, width/f)
    rng: object  # numpy Generator, TorchCPUGenerator or RowGenerators
    seed: int | None
    seeds: list[int] | None
    guided: bool
    unet_inputs: dict
    latents: np.ndarray | None
    sample: Callable
    guidance: float = 7.5
    text_encoders: list[str] | None = None  # the encoder graphs that run (SD3's T5 may be off)
    skip_layers: dict | None = None  # skip-layer guidance settings (runtime/flow.py), None: off

    @property
    def batch(self) -> int:
        return self.shape[0]

    def draw(self, channels: int | None = None) -> np.ndarray:
        """The unit starting noise: the caller's ``latents``, else drawn from the generator.
        ``channels``: other unit noise at the latent's size from the generator (the x4 upscaler's picture)."""
        if channels is not None:
            return self.rng.standard_normal((self.shape[0], channels, *self.shape[2:]), dtype=np.float32)
        noise = self.rng.standard_normal(self.shape, dtype=np.float32) if self.latents is None else self.latents
        return np.asarray(noise, dtype=np.float32)

    def sample_latent(self, moments) -> np.ndarray:
        return self.sample(moments, self.rng)


class RowGenerators:
    """One generator per image of a batch: row i of every draw comes from generator i, so an image
    in a batch gets the noise a single run with its seed gets (for the samplers' ``rng`` too)."""

    def __init__(self, generators: list[np.random.Generator]):
        self.generators = generators

    def standard_normal(self, shape, dtype=np.float64):
        if shape[0] != len(self.generators):
            raise ValueError(f"draws of {shape[0]} rows from {len(self.generators)} generators")
        return np.stack([g.standard_normal(tuple(shape[1:]), dtype=dtype) for g in self.generators])
