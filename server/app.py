"""The HTTP API: AUTOMATIC1111's ``/sdapi/v1`` subset over one loaded edgediff model.

Endpoints only translate requests into GenerationRequests (checked by the runtime, run by
worker.Worker) and results into A1111's response shapes; every request is checked, and the
server's own limits applied, before it takes a queue slot.
"""

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgediff import __version__
from edgediff.runtime import Pipeline, metadata
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.request import DEFAULT_SAMPLER, GenerationRequest
from edgediff.runtime.samplers import SAMPLERS
from edgediff.runtime.schedules import SCHEDULES

from . import schemas, upscalers
from .controlnet import ControlNetApi
from .guard import Guard
from .images import BadImage, decode_image, encode_png, image_bytes, latent_preview
from .page import PageFront, mount_page, open_when_started
from .worker import Job, QueueFull, Worker

log = logging.getLogger("edgediff.server")
POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there


@dataclass
class Limits:
    """What one request may ask for; all configurable (``edgediff serve --help``)."""

    max_side: int = 2048          # width and height, pixels
    max_pixels: int = 2048 * 2048  # width * height of an output
    max_steps: int = 150
    max_images: int = 8           # batch_size * n_iter
    max_queue: int = 16           # requests waiting behind the running one; more get 503
    max_body_bytes: int = 32 << 20
    max_input_pixels: int = 4096 * 4096  # decoded size of an uploaded image, checked from its header


def hires_settings(req: schemas.Txt2ImgRequest, upscaler_dir: Path | None = None) -> dict:
    """A1111's hr_* fields as the runtime's ``hires=`` (checked by the request); ``hr_upscaler``
    names one of ours or a folder in ``upscaler_dir`` (upscalers.py), never a path."""
    return dict(scale=req.hr_scale, steps=req.hr_second_pass_steps, strength=req.denoising_strength,
                upscaler=upscalers.resolve(req.hr_upscaler, upscaler_dir), width=req.hr_resize_x,
                height=req.hr_resize_y)


# Long on purpose for now: FastAPI endpoints as closures over one pipeline, worker and limits; each endpoint
# only translates (GenerationRequest does the checks). ControlNet's routes already live in server/controlnet.py's
# router; moving the A1111 endpoints into routers the same way is the next step.
def create_app(pipe: Pipeline | None = None, *, model: str | Path | None = None, provider: str = "auto",
               memory: str = "high", api_key: str | None = None, api_auth: list[str] | None = None,
               limits: Limits | None = None, lora_dir: str | Path | None = None,
               controlnet_dir: str | Path | None = None, control_depth_model: str | Path | None = None,
               upscaler_dir: str | Path | None = None):
    """The ASGI app. ``pipe``: an already loaded Pipeline; otherwise ``model`` (None: the shipped
    default model) is loaded with ``provider`` and ``memory``. ``api_key``/``api_auth``
    ("user:password" strings) protect every endpoint but ``/health`` (and the web page's static
    files, page.py); ``<lora:name:weight>`` tags in prompts are looked up in ``lora_dir``; ControlNet
    units (sd-webui-controlnet's API, server/controlnet.py) name folders in ``controlnet_dir``; hires
    upscaler names, folders in ``upscaler_dir`` (exported pixel upscalers, listed by /sdapi/v1/upscalers)."""
    limits = limits or Limits()
    pipe = pipe if pipe is not None else Pipeline.load(model, provider=provider, memory=memory)
    worker = Worker(pipe, limits.max_queue)
    identity = metadata.model_identity(pipe.model_dir, pipe.manifest)
    title = f"{identity['model_name']} [{identity.get('model_hash', '')}]"
    options: dict[str, Any] = {"sd_model_checkpoint": title, "sd_checkpoint_hash": pipe.manifest.graphs["unet"].sha256,
                               "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="edgediff", version=__version__, docs_url="/docs", lifespan=lifespan,
                  description="AUTOMATIC1111's `/sdapi/v1` API subset, served by edgediff's torch-free runtime.")
    app.state.worker = worker
    controlnets = ControlNetApi(controlnet_dir, control_depth_model, pipe.manifest.default_size,
                                limits.max_input_pixels)
    app.include_router(controlnets.router)

    pix2pix = pipe.unet_kind == "instruct-pix2pix"

    def bad(detail: str, status: int = 422):
        raise HTTPException(status, detail)

    def plan(req: schemas.Txt2ImgRequest, image: Image.Image | None = None, mask: Image.Image | None = None):
        """One checked GenerationRequest per image: A1111's seeds are seed, seed+1, ... per image.
        The request's rules are the runtime's (runtime/request.py); the limits are this server's."""
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
            lora_dir=lora_dir, control=controlnets.units(req, image) or None,
            t5=req.t5, skip_layer_guidance=req.skip_layer_guidance,
            **(dict(strength=req.denoising_strength) if image is not None else {}),
            **(dict(image_guidance=req.image_cfg_scale) if pix2pix and getattr(req, "image_cfg_scale", None)
               is not None else {}),  # clients send it for every model; A1111 reads it on pix2pix only
            **(dict(noise_level=req.noise_level) if getattr(req, "noise_level", None) is not None else {}),
            **(dict(hires=hires_settings(req, upscaler_dir and Path(upscaler_dir))) if req.enable_hr and image is None
               else {}),
            **(dict(mask_blur=req.mask_blur) if mask is not None and req.mask_blur is not None else {}))
        checked = request.check(pipe.manifest)  # an EdgediffError is a 422 (user_error below)
        sizes = [(checked.width, checked.height, "")] + \
            ([(*checked.hires.target, "hires ")] if checked.hires is not None else [])
        for width, height, what in sizes:
            for label, side in (("width", width), ("height", height)):
                if side > limits.max_side:
                    bad(f"{what}{label} must be at most {limits.max_side}, not {side}")
            if width * height > limits.max_pixels:
                bad(f"{what}width x height is {width * height} pixels, over the limit of {limits.max_pixels}")
        return [dataclasses.replace(request, seed=seed + i) for i in range(count)], checked

    def finisher(req: schemas.Txt2ImgRequest, calls: list[GenerationRequest], checked: GenerationRequest):
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

    async def run(request: Request, req: schemas.Txt2ImgRequest, planned) -> Any:
        calls, checked = planned
        loop = asyncio.get_running_loop()
        job = Job(calls, finisher(req, calls, checked), loop, loop.create_future())
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        try:
            worker.submit(job)
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

    def images_of(req: schemas.Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
        image = decode_image(req.init_images[0], "init_images[0]", limits.max_input_pixels)
        mask = None
        if req.mask:
            mask = decode_image(req.mask, "mask", limits.max_input_pixels).convert("L")
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        return image, mask

    responses = {422: {"description": "bad input"}, 503: {"description": "queue full (Retry-After)"}}
    bounds = dict(multiple=pipe.manifest.size_multiple, max_side=limits.max_side, max_steps=limits.max_steps,
                  max_images=limits.max_images)
    Txt2Img = schemas.bounded(schemas.Txt2ImgRequest, **bounds)
    Img2Img = schemas.bounded(schemas.Img2ImgRequest, **bounds)

    @app.get("/health", tags=["server"])
    async def health():
        return {"status": "ok", "model": title, "queued": worker.pending(), "completed": worker.completed}

    @app.post("/sdapi/v1/txt2img", response_model=schemas.ImagesResponse, responses=responses, tags=["sdapi"])
    async def txt2img(req: Txt2Img, request: Request):
        return await run(request, req, await asyncio.to_thread(plan, req))

    @app.post("/sdapi/v1/img2img", response_model=schemas.ImagesResponse, responses=responses, tags=["sdapi"])
    async def img2img(req: Img2Img, request: Request):
        image, mask = await asyncio.to_thread(images_of, req)  # decoding stays off the event loop
        return await run(request, req, await asyncio.to_thread(plan, req, image, mask))

    @app.get("/sdapi/v1/samplers", response_model=list[schemas.SamplerItem], tags=["sdapi"])
    async def samplers():
        items = []
        for name, spec in SAMPLERS.items():
            label, schedule = metadata.sampler_label(name)
            options = {}
            if spec.schedule:  # e.g. dpmpp_2m_karras: A1111's older "DPM++ 2M Karras"
                label, options = f"{label} {schedule}", {"scheduler": spec.schedule}
            aliases = [a for a in (name, *spec.aliases) if a != label]
            items.append(schemas.SamplerItem(name=label, aliases=aliases, options=options))
        return items

    @app.get("/sdapi/v1/schedulers", response_model=list[schemas.SchedulerItem], tags=["sdapi"])
    async def schedulers():
        return [schemas.SchedulerItem(name="automatic", label=metadata.AUTOMATIC)] + [
            schemas.SchedulerItem(name=s, label=metadata.A1111_SCHEDULES.get(s, s), default_rho=7.0 if s == "karras" else -1)
            for s in SCHEDULES]

    @app.get("/sdapi/v1/sd-models", response_model=list[schemas.SDModelItem], tags=["sdapi"])
    async def sd_models():
        return [schemas.SDModelItem(title=title, model_name=identity["model_name"], hash=identity.get("model_hash"),
                                    sha256=options["sd_checkpoint_hash"], filename=identity["model_name"])]

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict[str, Any]:
        return options

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(body: dict[str, Any]) -> None:
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and wanted not in (title, identity["model_name"]):
            bad(f"this server has one model loaded ({title}); start another server for {str(wanted)[:200]!r}")
        # Known settings are kept (and read back); others are ignored, as A1111 ignores unknown ones.
        options.update((k, v) for k, v in body.items() if k in options and k not in ("sd_model_checkpoint", "sd_checkpoint_hash"))
        return None

    @app.get("/sdapi/v1/progress", response_model=schemas.ProgressResponse, tags=["sdapi"])
    async def progress(skip_current_image: bool = Query(False)):
        job, queued = worker.current, worker.pending()
        if job is None:
            return schemas.ProgressResponse(progress=0.0, eta_relative=0.0, state=schemas.ProgressState(job_count=queued))
        done = (job.image_no + job.step / max(job.steps, 1)) / len(job.calls)
        elapsed = time.perf_counter() - job.started
        latents = job.latents
        return schemas.ProgressResponse(
            progress=done, eta_relative=elapsed / done - elapsed if done > 0 else 0.0,
            state=schemas.ProgressState(job=f"job {id(job):x}", job_count=queued + 1, job_no=job.image_no,
                                        job_timestamp=job.timestamp, sampling_step=job.step,
                                        sampling_steps=job.steps, interrupted=job.interrupted.is_set()),
            current_image=None if skip_current_image or latents is None else encode_png(latent_preview(latents), None))

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info", response_model=schemas.PngInfoResponse, tags=["sdapi"])
    async def png_info(req: schemas.PngInfoRequest):
        def read():
            decode_image(req.image, "image", limits.max_input_pixels)  # the same checks as any upload
            with Image.open(io.BytesIO(image_bytes(req.image, "image"))) as image:
                text = metadata.read_infotext(image) or ""
                items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
            return {"info": text, "items": items, "parameters": metadata.parse_infotext(text) if text else {}}
        return await asyncio.to_thread(read)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                             for e in error.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(BadImage)
    @app.exception_handler(EdgediffError)
    async def user_error(request, error: Exception):
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request, error: Exception):
        log.error("internal error on %s", request.url.path, exc_info=error)
        return JSONResponse({"detail": f"internal server error ({type(error).__name__}); see the server log"},
                            status_code=500)

    upscalers.add_routes(app, upscaler_dir and Path(upscaler_dir))
    mount_page(app, pipe=pipe, limits=limits, lora_dir=lora_dir)
    return PageFront(Guard(app, max_body_bytes=limits.max_body_bytes, api_key=api_key, api_auth=api_auth))


def serve(model: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 7860, provider: str = "auto",
          memory: str = "high", api_key: str | None = None, api_auth: list[str] | None = None,
          limits: Limits | None = None, log_level: str = "info", lora_dir: str | Path | None = None,
          open_page: bool = False, controlnet_dir: str | Path | None = None,
          control_depth_model: str | Path | None = None, upscaler_dir: str | Path | None = None) -> None:
    """Load the model and serve the API and the web page until interrupted (blocking);
    ``open_page``: open the page in the browser once the server listens."""
    import uvicorn

    app = create_app(model=model, provider=provider, memory=memory, api_key=api_key, api_auth=api_auth, limits=limits,
                     lora_dir=lora_dir, controlnet_dir=controlnet_dir, control_depth_model=control_depth_model,
                     upscaler_dir=upscaler_dir)
    if host not in ("127.0.0.1", "localhost", "::1") and not (api_key or api_auth):
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    if open_page:
        open_when_started(server, host, port)
    server.run()
