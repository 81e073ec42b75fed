"""A1111's generation endpoints: ``POST /sdapi/v1/txt2img`` and ``/img2img``, and the running job's
``GET /sdapi/v1/progress`` and ``POST /sdapi/v1/interrupt``.

Endpoints only translate requests into GenerationRequests (checked by the runtime, run by
worker.Worker) and results into A1111's response shapes; every request is checked, and the
server's own limits applied, before it takes a queue slot.
"""

import asyncio
import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from PIL import Image, ImageOps

from edgediff import __version__
from edgediff.runtime import Pipeline, metadata
from edgediff.runtime.request import DEFAULT_SAMPLER, GenerationRequest

from . import schemas, upscalers
from .controlnet import ControlNetApi
from .errors import bad
from .images import decode_image, encode_png, latent_preview
from .worker import Job, QueueFull, Worker

if TYPE_CHECKING:
    from .app import Limits

POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there
RESPONSES = {422: {"description": "bad input"}, 503: {"description": "queue full (Retry-After)"}}


def hires_settings(req: schemas.Txt2ImgRequest, upscaler_dir: Path | None = None) -> dict:
    """A1111's hr_* fields as the runtime's ``hires=`` (checked by the request); ``hr_upscaler``
    names one of ours or a folder in ``upscaler_dir`` (upscalers.py), never a path."""
    return dict(scale=req.hr_scale, steps=req.hr_second_pass_steps, strength=req.denoising_strength,
                upscaler=upscalers.resolve(req.hr_upscaler, upscaler_dir), width=req.hr_resize_x,
                height=req.hr_resize_y)


class GenerationApi:
    """txt2img and img2img over one pipeline and its worker: ``router`` (the two generation
    endpoints) and ``progress_router`` (progress and interrupt)."""

    def __init__(self, pipe: Pipeline, worker: Worker, limits: "Limits", identity: dict,
                 controlnets: ControlNetApi, lora_dir: str | Path | None, upscaler_dir: str | Path | None):
        self.pipe, self.worker, self.limits, self.identity = pipe, worker, limits, identity
        self.controlnets, self.lora_dir = controlnets, lora_dir
        self.upscaler_dir = upscaler_dir and Path(upscaler_dir)
        self.pix2pix = pipe.unet_kind == "instruct-pix2pix"
        self.router = self._generation_routes()
        self.progress_router = self._progress_routes()

    def plan(self, req: schemas.Txt2ImgRequest, image: Image.Image | None = None, mask: Image.Image | None = None):
        """One checked GenerationRequest per image: A1111's seeds are seed, seed+1, ... per image.
        The request's rules are the runtime's (runtime/request.py); the limits are this server's."""
        limits = self.limits
        count = req.batch_size * req.n_iter
        if count > limits.max_images:
            bad(f"batch_size x n_iter must be at most {limits.max_images}, not {count}")
        if req.steps > limits.max_steps:
            bad(f"steps must be at most {limits.max_steps}, not {req.steps}")
        if req.enable_hr and req.hr_second_pass_steps > limits.max_steps:
            bad(f"hr_second_pass_steps must be at most {limits.max_steps}, not {req.hr_second_pass_steps}")
        seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed  # -1: random, reported back
        request = GenerationRequest(
            req.prompt, req.negative_prompt, steps=req.steps, guidance=req.cfg_scale,
            sampler=req.sampler_name or req.sampler_index or DEFAULT_SAMPLER, schedule=req.scheduler,
            width=req.width, height=req.height, image=image, mask=mask, prompt_syntax=req.prompt_syntax,
            lora_dir=self.lora_dir, control=self.controlnets.units(req, image) or None,
            t5=req.t5, skip_layer_guidance=req.skip_layer_guidance,
            **(dict(strength=req.denoising_strength) if image is not None else {}),
            **(dict(image_guidance=req.image_cfg_scale) if self.pix2pix and getattr(req, "image_cfg_scale", None)
               is not None else {}),  # clients send it for every model; A1111 reads it on pix2pix only
            **(dict(noise_level=req.noise_level) if getattr(req, "noise_level", None) is not None else {}),
            **(dict(hires=hires_settings(req, self.upscaler_dir)) if req.enable_hr and image is None else {}),
            **(dict(mask_blur=req.mask_blur) if mask is not None and req.mask_blur is not None else {}))
        checked = request.check(self.pipe.manifest)  # an EdgediffError is a 422 (errors.py)
        sizes = [(checked.width, checked.height, "")] + \
            ([(*checked.hires.target, "hires ")] if checked.hires is not None else [])
        for width, height, what in sizes:
            for label, side in (("width", width), ("height", height)):
                if side > limits.max_side:
                    bad(f"{what}{label} must be at most {limits.max_side}, not {side}")
            if width * height > limits.max_pixels:
                bad(f"{what}width x height is {width * height} pixels, over the limit of {limits.max_pixels}")
        return [dataclasses.replace(request, seed=seed + i) for i in range(count)], checked

    def finisher(self, req: schemas.Txt2ImgRequest, calls: list[GenerationRequest], checked: GenerationRequest):
        identity = self.identity

        def finish(outputs: list, interrupted: bool) -> dict:
            images = [image for image, _ in outputs]
            texts = [metadata.request_infotext(result.request if result else checked, image, 0, call.seed,
                                               result.lora_files if result else (), identity)
                     for call, (image, result) in zip(calls, outputs)]
            first = dataclasses.replace(checked, seed=calls[0].seed)
            sampler, schedule = metadata.sampler_label(first.sampler, first.schedule)
            info = {
                "prompt": req.prompt, "all_prompts": [req.prompt] * len(images),
                "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(images),
                "seed": first.seed, "all_seeds": [c.seed for c in calls[: len(images)]],
                "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
                "width": first.width, "height": first.height, "sampler_name": sampler,
                "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
                "restore_faces": False, "face_restoration_model": None,
                "sd_model_name": identity["model_name"], "sd_model_hash": identity.get("model_hash"),
                "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
                "denoising_strength": first.hires.strength if first.hires is not None else
                first.strength if first.image is not None else None,
                "extra_generation_params": {"Schedule type": schedule},
                "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "clip_skip": 1, "is_using_inpainting_conditioning": False, "interrupted": interrupted,
                "version": f"edgediff {__version__}",
            }
            encoded = [encode_png(image, text) for image, text in zip(images, texts)] if req.send_images else []
            parameters = req.model_dump()
            if not getattr(req, "include_init_images", True):
                parameters.update(init_images=None, mask=None)
            return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}
        return finish

    async def run(self, request: Request, req: schemas.Txt2ImgRequest, planned) -> Any:
        calls, checked = planned
        loop = asyncio.get_running_loop()
        job = Job(calls, self.finisher(req, calls, checked), loop, loop.create_future())
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        try:
            self.worker.submit(job)
        except QueueFull as full:
            raise HTTPException(503, "the generation queue is full; retry later",
                                headers={"Retry-After": str(full.retry_after)}) from None
        try:
            while not job.future.done():
                await asyncio.wait({job.future}, timeout=POLL_SECONDS)
                if not job.future.done() and await request.is_disconnected():
                    job.abandon()  # queued: dropped before it runs; running: stopped at the next step
                    return Response(status_code=499)
        except asyncio.CancelledError:
            job.abandon()
            raise
        return job.future.result()

    def images_of(self, req: schemas.Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
        image = decode_image(req.init_images[0], "init_images[0]", self.limits.max_input_pixels)
        mask = None
        if req.mask:
            mask = decode_image(req.mask, "mask", self.limits.max_input_pixels).convert("L")
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        return image, mask

    def _generation_routes(self) -> APIRouter:
        limits = self.limits
        bounds = dict(multiple=self.pipe.manifest.size_multiple, max_side=limits.max_side,
                      max_steps=limits.max_steps, max_images=limits.max_images)
        Txt2Img = schemas.bounded(schemas.Txt2ImgRequest, **bounds)
        Img2Img = schemas.bounded(schemas.Img2ImgRequest, **bounds)
        router = APIRouter(tags=["sdapi"])

        @router.post("/sdapi/v1/txt2img", response_model=schemas.ImagesResponse, responses=RESPONSES)
        async def txt2img(req: Txt2Img, request: Request):
            return await self.run(request, req, await asyncio.to_thread(self.plan, req))

        @router.post("/sdapi/v1/img2img", response_model=schemas.ImagesResponse, responses=RESPONSES)
        async def img2img(req: Img2Img, request: Request):
            image, mask = await asyncio.to_thread(self.images_of, req)  # decoding stays off the event loop
            return await self.run(request, req, await asyncio.to_thread(self.plan, req, image, mask))

        return router

    def _progress_routes(self) -> APIRouter:
        worker = self.worker
        router = APIRouter(tags=["sdapi"])

        @router.get("/sdapi/v1/progress", response_model=schemas.ProgressResponse)
        async def progress(skip_current_image: bool = Query(False)):
            job, queued = worker.current, worker.pending()
            if job is None:
                return schemas.ProgressResponse(progress=0.0, eta_relative=0.0,
                                                state=schemas.ProgressState(job_count=queued))
            done = (job.image_no + job.step / max(job.steps, 1)) / len(job.calls)
            elapsed = time.perf_counter() - job.started
            latents = job.latents
            return schemas.ProgressResponse(
                progress=done, eta_relative=elapsed / done - elapsed if done > 0 else 0.0,
                state=schemas.ProgressState(job=f"job {id(job):x}", job_count=queued + 1, job_no=job.image_no,
                                            job_timestamp=job.timestamp, sampling_step=job.step,
                                            sampling_steps=job.steps, interrupted=job.interrupted.is_set()),
                current_image=None if skip_current_image or latents is None else encode_png(latent_preview(latents), None))

        @router.post("/sdapi/v1/interrupt")
        async def interrupt():
            worker.interrupt()
            return {}

        return router
