"""The HTTP API: AUTOMATIC1111's ``/sdapi/v1`` subset over one loaded edgediff model.

``create_app`` only assembles: the model, its worker and the routers (controlnet.py, generation.py,
info.py, upscalers.py, page.py), the error handlers (errors.py), and in front the API key guard
(guard.py) and the web page's static files (page.py).
"""

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from edgediff import __version__
from edgediff.runtime import Pipeline, metadata

from . import info, upscalers
from .controlnet import ControlNetApi
from .errors import add_error_handlers
from .generation import GenerationApi
from .guard import Guard
from .page import PageFront, mount_page, open_when_started
from .worker import Worker


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

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="edgediff", version=__version__, docs_url="/docs", lifespan=lifespan,
                  description="AUTOMATIC1111's `/sdapi/v1` API subset, served by edgediff's torch-free runtime.")
    app.state.worker = worker
    controlnets = ControlNetApi(controlnet_dir, control_depth_model, pipe.manifest.default_size,
                                limits.max_input_pixels)
    generation = GenerationApi(pipe, worker, limits, identity, controlnets, lora_dir, upscaler_dir)
    app.include_router(controlnets.router)

    @app.get("/health", tags=["server"])
    async def health():
        return {"status": "ok", "model": title, "queued": worker.pending(), "completed": worker.completed}

    # /openapi.json (and /docs) list routes in the order they are added: the order clients have always seen.
    app.include_router(generation.router)
    app.include_router(info.router(title, identity, pipe.manifest.graphs["unet"].sha256))
    app.include_router(generation.progress_router)
    app.include_router(info.png_info_router(limits.max_input_pixels))
    add_error_handlers(app)
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
