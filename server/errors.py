"""How errors leave the API: JSON with a one-line ``detail``. Bad input is a 422 (pydantic's field
errors joined into one line, the runtime's InputError/EdgediffError, an unreadable image, ``bad``);
anything unexpected is a 500 naming only the exception's type, its traceback going to the log."""

import logging

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgediff.runtime.errors import EdgediffError

from .images import BadImage

log = logging.getLogger("edgediff.server")


def bad(detail: str):
    raise HTTPException(422, detail)


def add_error_handlers(app: FastAPI) -> None:
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
