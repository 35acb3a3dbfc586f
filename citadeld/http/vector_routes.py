"""Vector and collection routes (native dialect). Each translates the wire format to one
VectorService call; durability and validation rules live in the service."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from citadeld.errors import BadRequest, Unavailable
from citadeld.http import vector_schemas as vs
from citadeld.http.body import compile_schema, json_response, read_json
from citadeld.logs import request_id
from citadeld.state import STATE
from citadeld.storage.service import VectorService

_store = compile_schema(vs.STORE_REQUEST)
_update = compile_schema(vs.UPDATE_REQUEST)
_search = compile_schema(vs.SEARCH_REQUEST)
_create = compile_schema(vs.COLLECTION_REQUEST)

_ITEM_KEYS = ("id", "text", "vector", "metadata")


def _svc(request: web.Request) -> VectorService:
    storage = getattr(request.app[STATE], "storage", None)
    if storage is None:
        raise Unavailable("the vector store is not configured in this daemon", retry_after=30)
    svc: VectorService = storage.service
    return svc


def _items(body: dict[str, Any]) -> list[dict[str, Any]]:
    single = {k: body[k] for k in _ITEM_KEYS if k in body}
    if "items" in body:
        if single:
            raise BadRequest("give items, or one item's fields at the top level, not both",
                             param="items")
        items: list[dict[str, Any]] = body["items"]
        return items
    if not single:
        raise BadRequest("give items (or one item's text or vector at the top level)",
                         param="items")
    return [single]


def _write_response(out: Any) -> web.Response:
    body = out.to_json() | {"request_id": request_id.get() or ""}
    if out.status == "queued":
        return json_response(body, status=202, headers={"Location": body["status_url"]})
    return json_response(body)


async def store(request: web.Request) -> web.Response:
    body = await read_json(request, _store)
    out = await _svc(request).store_items(body.get("collection"), _items(body),
                                          body.get("model"), request_id.get())
    return _write_response(out)


async def update(request: web.Request) -> web.Response:
    body = await read_json(request, _update)
    out = await _svc(request).update_items(body.get("collection"), _items(body),
                                           body.get("model"), request_id.get())
    return _write_response(out)


async def search(request: web.Request) -> web.Response:
    body = await read_json(request, _search)
    out = await _svc(request).search(
        body.get("collection"), text=body.get("text"), vector=body.get("vector"),
        model=body.get("model"), limit=body.get("limit", 10), filter=body.get("filter"),
        score_threshold=body.get("score_threshold"),
        with_vectors=body.get("with_vectors", False))
    return json_response(out | {"request_id": request_id.get() or ""})


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise BadRequest(f"query parameter {name} must be true or false", param=name)


async def get_vector(request: web.Request) -> web.Response:
    out = await _svc(request).get_item(request.query.get("collection"),
                                       request.match_info["id"], _flag(request, "with_vector"))
    return json_response(out)


async def delete_vector(request: web.Request) -> web.Response:
    out = await _svc(request).delete_item(request.query.get("collection"),
                                          request.match_info["id"], request_id.get())
    return _write_response(out)


async def operation(request: web.Request) -> web.Response:
    raw = request.match_info["operation"]
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest("operation must be a positive integer", param="operation")
    return json_response(await _svc(request).operation(int(raw)))


async def list_collections(request: web.Request) -> web.Response:
    return json_response({"collections": await _svc(request).list_collections()})


async def create_collection(request: web.Request) -> web.Response:
    body = await read_json(request, _create)
    info, created = await _svc(request).create_collection(
        body["name"], body.get("model"), body.get("dimension"), body.get("distance", "cosine"),
        body.get("raw", False))
    return json_response(info.to_json(), status=201 if created else 200)


async def get_collection(request: web.Request) -> web.Response:
    svc = _svc(request)
    name = request.match_info["name"]
    svc._forget(name)  # fresh point count
    return json_response((await svc.collection(name)).to_json())


async def delete_collection(request: web.Request) -> web.Response:
    svc = _svc(request)
    name = request.match_info["name"]
    info = await svc.collection(name)
    await svc.drop_collection(name)
    return json_response(info.to_json() | {"deleted": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/vectors/store", store)
    app.router.add_post("/api/v1/vectors/search", search)
    app.router.add_post("/api/v1/vectors/update", update)
    app.router.add_get("/api/v1/vectors/operations/{operation}", operation)
    app.router.add_get("/api/v1/vectors/{id}", get_vector)
    app.router.add_delete("/api/v1/vectors/{id}", delete_vector)
    app.router.add_get("/api/v1/collections", list_collections)
    app.router.add_post("/api/v1/collections", create_collection)
    app.router.add_get("/api/v1/collections/{name}", get_collection)
    app.router.add_delete("/api/v1/collections/{name}", delete_collection)
