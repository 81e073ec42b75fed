"""A1111's endpoints that describe this server: ``GET /sdapi/v1/samplers``, ``/schedulers`` and
``/sd-models``, ``GET|POST /sdapi/v1/options``, and ``POST /sdapi/v1/png-info`` (a PNG's
parameters read back). Upscalers are listed by upscalers.py, LoRAs by page.py."""

import asyncio
import io
from typing import Any

from fastapi import APIRouter
from PIL import Image

from edgediff.runtime import metadata
from edgediff.runtime.samplers import SAMPLERS
from edgediff.runtime.schedules import SCHEDULES

from . import schemas
from .errors import bad
from .images import decode_image, image_bytes


def router(title: str, identity: dict, unet_sha256: str) -> APIRouter:
    """The listings and the options of the one loaded model (``title``: A1111's ``name [hash]``)."""
    options: dict[str, Any] = {"sd_model_checkpoint": title, "sd_checkpoint_hash": unet_sha256,
                               "samples_format": "png", "CLIP_stop_at_last_layers": 1}
    router = APIRouter(tags=["sdapi"])

    @router.get("/sdapi/v1/samplers", response_model=list[schemas.SamplerItem])
    async def samplers():
        items = []
        for name, spec in SAMPLERS.items():
            label, schedule = metadata.sampler_label(name)
            extra = {}
            if spec.schedule:  # e.g. dpmpp_2m_karras: A1111's older "DPM++ 2M Karras"
                label, extra = f"{label} {schedule}", {"scheduler": spec.schedule}
            aliases = [a for a in (name, *spec.aliases) if a != label]
            items.append(schemas.SamplerItem(name=label, aliases=aliases, options=extra))
        return items

    @router.get("/sdapi/v1/schedulers", response_model=list[schemas.SchedulerItem])
    async def schedulers():
        return [schemas.SchedulerItem(name="automatic", label=metadata.AUTOMATIC)] + [
            schemas.SchedulerItem(name=s, label=metadata.A1111_SCHEDULES.get(s, s), default_rho=7.0 if s == "karras" else -1)
            for s in SCHEDULES]

    @router.get("/sdapi/v1/sd-models", response_model=list[schemas.SDModelItem])
    async def sd_models():
        return [schemas.SDModelItem(title=title, model_name=identity["model_name"], hash=identity.get("model_hash"),
                                    sha256=options["sd_checkpoint_hash"], filename=identity["model_name"])]

    @router.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return options

    @router.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]) -> None:
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and wanted not in (title, identity["model_name"]):
            bad(f"this server has one model loaded ({title}); start another server for {str(wanted)[:200]!r}")
        # Known settings are kept (and read back); others are ignored, as A1111 ignores unknown ones.
        options.update((k, v) for k, v in body.items() if k in options and k not in ("sd_model_checkpoint", "sd_checkpoint_hash"))
        return None

    return router


def png_info_router(max_input_pixels: int) -> APIRouter:
    router = APIRouter(tags=["sdapi"])

    @router.post("/sdapi/v1/png-info", response_model=schemas.PngInfoResponse)
    async def png_info(req: schemas.PngInfoRequest):
        def read():
            decode_image(req.image, "image", max_input_pixels)  # the same checks as any upload
            with Image.open(io.BytesIO(image_bytes(req.image, "image"))) as image:
                text = metadata.read_infotext(image) or ""
                items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
            return {"info": text, "items": items, "parameters": metadata.parse_infotext(text) if text else {}}
        return await asyncio.to_thread(read)

    return router
