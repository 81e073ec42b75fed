"""The ASGI layer in front of the app: API key / basic auth, and a bound on request bodies.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so that the endpoints still see the
client's disconnect through ``receive``.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json

OPEN_PATHS = frozenset({"/health"})
DRAIN_LIMIT = 64 << 20  # read and discard this much of an oversized body so the client sees the 413


class Guard:
    def __init__(self, app, *, max_body_bytes: int, api_key: str | None = None, api_auth: list[str] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.credentials = list(api_auth or [])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if (self.api_key or self.credentials) and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _reply(send, 401, "missing or wrong API key: send `Authorization: Bearer KEY`, "
                                "`X-API-Key: KEY` or HTTP basic auth", {"www-authenticate": 'Basic realm="edgediff"'})
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size <= self.max_body_bytes:
                chunks.append(body)
            elif size > self.max_body_bytes + DRAIN_LIMIT:
                break
        if size > self.max_body_bytes:
            return await _reply(send, 413, f"request body is over the limit of {self.max_body_bytes} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the client's disconnect, if it goes away

        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        offered = []
        if headers.get("x-api-key"):
            offered.append(("key", headers["x-api-key"]))
        if scheme.lower() == "bearer":
            offered.append(("key", value.strip()))
        elif scheme.lower() == "basic":
            try:
                user_password = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                user_password = ""
            offered.append(("basic", user_password))
            offered.append(("key", user_password.partition(":")[2]))  # any user name, the key as password
        ok = False
        for kind, secret in offered:  # compare_digest everywhere: no timing hints
            if kind == "key" and self.api_key:
                ok |= hmac.compare_digest(secret.encode(), self.api_key.encode())
            if kind == "basic":
                for credential in self.credentials:
                    ok |= hmac.compare_digest(secret.encode(), credential.encode())
        return ok


async def _reply(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
