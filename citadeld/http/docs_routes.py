"""/openapi.json and a Swagger UI at /docs whose assets the daemon serves itself.

Clusters often run without internet access and a docs page must not leak requests to a CDN,
so the HTML, its script and its assets all come from this process (the `swagger_ui_bundle`
package); the page disables Swagger UI's online validator badge for the same reason. The
bundled Swagger UI (4.x) cannot render OpenAPI 3.1, so the page loads a 3.0 rendering of the
same document from /docs/openapi-3.0.json; /openapi.json itself stays 3.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import orjson
import swagger_ui_bundle
from aiohttp import web

from citadeld import __version__
from citadeld.http.openapi import build_openapi, downgrade_to_30
from citadeld.state import STATE

_ASSET_DIR = Path(str(swagger_ui_bundle.swagger_ui_path))
# the bundle version is part of the URL, so assets can be cached forever: an upgrade of the
# package changes every asset URL
STATIC_PREFIX = f"/docs/static/{_ASSET_DIR.name}"
OPENAPI_30_PATH = "/docs/openapi-3.0.json"

# only what the page uses (plus source maps for devtools); nothing else in the bundle directory
# (its index.html and initializer point at the public petstore) is reachable
_ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css",
    "swagger-ui.css.map": "application/json",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-bundle.js.map": "application/json",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_ASSET_CACHE = "public, max-age=31536000, immutable"
_DOC_CACHE = "no-cache"  # cheap to revalidate, and it changes with the version and the config

# relative URLs, so the page also works behind a reverse proxy that mounts the daemon on a
# path prefix (from /prefix/docs they resolve to /prefix/docs/static/...)
_STATIC_REL = STATIC_PREFIX.lstrip("/")
_CONFIG = {
    "url": OPENAPI_30_PATH.lstrip("/"),
    "dom_id": "#swagger-ui",
    "deepLinking": True,
    "layout": "BaseLayout",
    "validatorUrl": None,  # the default posts the spec URL to validator.swagger.io
    "queryConfigEnabled": False,  # no ?url=... pointing the page at another spec
}
_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>citadeld API</title>
<link rel="stylesheet" href="{_STATIC_REL}/swagger-ui.css">
<link rel="icon" type="image/png" href="{_STATIC_REL}/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="{_STATIC_REL}/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{_STATIC_REL}/swagger-ui-bundle.js"></script>
<script>
const config = {json.dumps(_CONFIG)};
config.presets = [SwaggerUIBundle.presets.apis];
window.ui = SwaggerUIBundle(config);
</script>
</body>
</html>
""".encode()


@dataclass
class _DocsCache:
    """Per app, filled on first request: the app may get its state after add_routes, and a
    started app must not gain new keys."""

    docs: tuple[bytes, bytes] | None = None  # (3.1 document, 3.0 rendering), serialized


_CACHE: web.AppKey[_DocsCache] = web.AppKey("citadel_docs_cache", _DocsCache)


def _documents(app: web.Application) -> tuple[bytes, bytes]:
    cache = app[_CACHE]
    if cache.docs is None:
        config = app[STATE].config
        doc = build_openapi(__version__, list(config.embedding.models),
                            getattr(config, "auth", None))
        cache.docs = (orjson.dumps(doc), orjson.dumps(downgrade_to_30(doc)))
    return cache.docs


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json",
                        headers={"Cache-Control": _DOC_CACHE})


async def openapi_json(request: web.Request) -> web.Response:
    return _json(_documents(request.app)[0])


async def openapi_30_json(request: web.Request) -> web.Response:
    return _json(_documents(request.app)[1])


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": _DOC_CACHE})


async def static_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.FileResponse(
        _ASSET_DIR / name,
        headers={"Content-Type": content_type, "Cache-Control": _ASSET_CACHE},
    )


def add_routes(app: web.Application) -> None:
    app[_CACHE] = _DocsCache()
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get(OPENAPI_30_PATH, openapi_30_json)
    app.router.add_get(STATIC_PREFIX + "/{name}", static_asset)
