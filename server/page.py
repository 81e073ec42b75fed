"""The web page at ``/``: static HTML, CSS and JavaScript from ``static/``, no build step.

The page's files hold no data and no secret, so they load without the API key; everything the page
then asks for goes through the API behind the Guard, and the page prompts for the key on a 401.
The two endpoints added here (``/sdapi/v1/loras``, A1111's, and ``/edgediff/v1/page``) are ordinary
routes of the guarded app.
"""
from __future__ import annotations

import mimetypes
import threading
import time
import webbrowser
from pathlib import Path
from typing import Any

from starlette.responses import Response

STATIC = Path(__file__).parent / "static"
LORA_SUFFIXES = (".safetensors",)  # what `<lora:name>` tags resolve to (runtime/adapters.py)


def mount_page(app, *, pipe, limits, lora_dir: str | Path | None) -> None:
    """Add the page's API endpoints to ``app`` (the FastAPI app, inside the Guard)."""

    @app.get("/sdapi/v1/loras", tags=["sdapi"])
    async def loras() -> list[dict[str, Any]]:
        """The LoRA folder's files (``edgediff serve --lora-dir``), as A1111 lists them; the prompt
        uses one with a ``<lora:name:weight>`` tag."""
        if lora_dir is None or not Path(lora_dir).is_dir():
            return []
        files = sorted(p for p in Path(lora_dir).iterdir() if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}} for p in files]

    @app.get("/edgediff/v1/page", tags=["page"])
    async def page_settings() -> dict[str, Any]:
        """What the page needs to set up its form: the model's native size and the server's limits."""
        return {"default_size": pipe.manifest.default_size, "size_multiple": pipe.manifest.size_multiple,
                "max_side": limits.max_side, "max_steps": limits.max_steps, "max_images": limits.max_images,
                "lora_dir": lora_dir is not None}


class PageFront:
    """ASGI app in front of the Guard: ``GET /`` and ``GET /page/<file>`` answer the page's static
    files (a fixed list, read at start-up: no path from the request reaches the file system); every
    other request goes to ``guarded``."""

    def __init__(self, guarded):
        self.guarded = guarded
        self.files = {f"/page/{p.name}": p for p in STATIC.iterdir() if p.is_file()}
        self.files["/"] = STATIC / "index.html"

    async def __call__(self, scope, receive, send):
        path = self.files.get(scope.get("path")) if scope["type"] == "http" else None
        if path is None or scope["method"] not in ("GET", "HEAD"):
            return await self.guarded(scope, receive, send)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        body = path.read_bytes()
        response = Response(body if scope["method"] == "GET" else b"", media_type=kind, headers={
            "cache-control": "no-cache", "x-content-type-options": "nosniff",
            # the page runs only its own files: no inline script, nothing from elsewhere
            "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "style-src 'self'; script-src 'self'; connect-src 'self'",
        })
        if scope["method"] == "HEAD":
            response.headers["content-length"] = str(len(body))
        await response(scope, receive, send)


def page_url(host: str, port: int) -> str:
    """The page's address as a browser on this machine reaches it (0.0.0.0 and :: listen everywhere)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def open_when_started(server, host: str, port: int, timeout: float = 600.0) -> threading.Thread:
    """Open the page in the default browser once ``server`` (a uvicorn.Server) listens."""
    def wait_and_open():
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or server.should_exit:
                return
            time.sleep(0.1)
        webbrowser.open(page_url(host, port))

    thread = threading.Thread(target=wait_and_open, name="edgediff-open-page", daemon=True)
    thread.start()
    return thread
