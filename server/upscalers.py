"""The hires fix's upscalers on the server: A1111's ``/sdapi/v1/upscalers`` and
``/sdapi/v1/latent-upscale-modes``, and ``hr_upscaler`` names resolved against ``--upscaler-dir``.

A client names an upscaler; it never gives a path: a name that is neither one of ours (or A1111's
label for it) nor a folder listed in ``--upscaler-dir`` is a 422.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from edgediff.runtime import hires
from edgediff.runtime.errors import InputError
from edgediff.runtime.pixel_upscaler import list_upscalers, read_upscaler_manifest


class UpscalerItem(BaseModel):  # A1111's fields
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


def resolve(name: str | None, folder: Path | None) -> str:
    """``hr_upscaler`` as the runtime's ``hires["upscaler"]``: one of ours, or a folder under ``folder``."""
    name = name or "Latent"
    found = list_upscalers(folder) if folder is not None else {}
    if name in found:
        return str(found[name])
    return _builtin(name, found)


def _builtin(name: str, found: dict) -> str:
    text = name.strip().lower().replace(" (", "-").replace(")", "").replace(" ", "-")
    if text in hires.UPSCALERS:
        return text
    raise InputError(f"unknown hires upscaler {name[:100]!r}; expected one of {', '.join(hires.UPSCALERS)}"
                     + (f", or an upscaler of this server: {', '.join(found)}" if found else ""))


def add_routes(app: FastAPI, folder: Path | None) -> None:
    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
    async def upscalers():
        items = [UpscalerItem(name=label) for name, (label, mode, _) in hires.UPSCALERS.items() if mode is None]
        for name, path in (list_upscalers(folder) if folder is not None else {}).items():
            manifest = read_upscaler_manifest(path)
            items.append(UpscalerItem(name=name, model_name=manifest.name, scale=manifest.scale))
        return items

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscaleModeItem], tags=["sdapi"])
    async def latent_upscale_modes():
        return [LatentUpscaleModeItem(name=label) for label, mode, _ in hires.UPSCALERS.values() if mode is not None]
