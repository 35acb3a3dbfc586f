"""CORS for browsers (the AG UI): preflights answered before auth, headers on every answer.

An origin listed by name gets ``Access-Control-Allow-Origin: <origin>`` and, if configured,
``Access-Control-Allow-Credentials: true``; ``*`` in the list admits any other origin without
credentials (a browser never sends cookies or Authorization it was not allowed to). Other
origins get no CORS headers, so the browser withholds the answer from the page. Headers are
added in ``on_response_prepare``, so error answers of any middleware carry them too (a page can
read its own 401).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from citadeld.security.config import CORSConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class CORS:
    def __init__(self, cfg: CORSConfig) -> None:
        self.named = frozenset(o for o in cfg.allow_origins if o != "*")
        self.any = "*" in cfg.allow_origins
        self.credentials = cfg.allow_credentials
        self.allow_headers = frozenset(h.lower() for h in cfg.allow_headers)
        self.allow_headers_value = ", ".join(cfg.allow_headers)
        self.expose = ", ".join(cfg.expose_headers)
        self.max_age = str(cfg.max_age_s)

    def origin_headers(self, origin: str) -> dict[str, str] | None:
        """The CORS headers for a request from `origin`; None: not an allowed origin."""
        if origin in self.named:
            h = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if self.credentials:
                h["Access-Control-Allow-Credentials"] = "true"
            return h
        if self.any:
            return {"Access-Control-Allow-Origin": "*"}
        return None

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        headers = self.origin_headers(origin)
        if headers is None:
            return web.Response(status=403, text="CORS: origin not allowed",
                                headers={"Vary": "Origin"})
        asked = request.headers.get("Access-Control-Request-Headers", "")
        wanted = [h.strip() for h in asked.split(",") if h.strip()]
        if any(h.lower() not in self.allow_headers for h in wanted):
            return web.Response(status=403, text="CORS: request header not allowed",
                                headers={"Vary": "Origin"})
        headers.update({
            "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": self.allow_headers_value,
            "Access-Control-Max-Age": self.max_age,
        })
        return web.Response(status=204, headers=headers)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method == "OPTIONS" and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers):
            return self.preflight(request)
        return await handler(request)

    async def on_response_prepare(self, request: web.Request,
                                  response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or request.method == "OPTIONS":
            return
        headers = self.origin_headers(origin)
        if headers is None:
            return
        out: CIMultiDict[str] = response.headers
        for k, v in headers.items():
            if k == "Vary" and "Vary" in out:
                if "origin" not in out["Vary"].lower():
                    out["Vary"] = out["Vary"] + ", Origin"
                continue
            out[k] = v
        if self.expose:
            out["Access-Control-Expose-Headers"] = self.expose
