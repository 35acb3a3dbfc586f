"""Live workflow events over websocket and SSE (issue 5).

- ``GET /ws/workflows/{id}``: one workflow's events from its retained beginning (or after
  ``?after=<id>``), then live; closed with 1000 after its terminal event.
- ``GET /ws``: every event the caller may see, live, plus client messages
  ``{"type": "subscribe", "workflow_id": ..., "after": ...}`` / ``{"type": "unsubscribe", ...}``
  (``workflow_id`` null or absent: all workflows) and ``{"type": "ping"}``. Control replies
  have lower-case types (``subscribed``, ``unsubscribed``, ``pong``, ``error``); events keep
  their upper-case AG-UI types.
- ``GET /api/v1/events``: SSE of all visible events or one workflow's (``?workflow_id=``),
  ``id:`` lines, ``Last-Event-ID`` (or ``?after=``) resume, heartbeat comments; a workflow
  stream ends after its terminal event and a reconnect past it gets 204 (EventSource stops).

Visibility: an event whose ``owner`` is another principal is shown to role admin only.
Streams bound their own time (``own_deadline``); a client that stops reading for
``send_timeout_s`` is dropped, one that falls behind gets GAP or is disconnected (bus policy);
nothing a client does reaches the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import weakref
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from citadeld.errors import BadRequest, CitadelError, NotFound, Unavailable
from citadeld.events.config import EventsConfig
from citadeld.events.hub import Accept, BusBase, SlowConsumer, Subscription
from citadeld.events.ids import is_id, parse_id
from citadeld.events.metrics import EventMetrics
from citadeld.events.model import GAP, TERMINAL, Event
from citadeld.http.llm_routes import own_deadline
from citadeld.security.principal import Principal, principal_of
from citadeld.state import STATE

log = logging.getLogger("citadeld.http")

WORKFLOW_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLOSE_SLOW = 4008  # application close code: fell behind the bus's slow-consumer policy
CLOSE_UNAVAILABLE = WSCloseCode.TRY_AGAIN_LATER  # 1013: event history unreachable
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8",
               "Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no",
               "Connection": "keep-alive"}
SSE_RETRY_MS = 2000

_SESSIONS: web.AppKey[weakref.WeakSet[Any]] = web.AppKey("citadel_event_sessions",
                                                          weakref.WeakSet)


# ---- shared ------------------------------------------------------------------------------


def visibility(principal: Principal) -> Accept | None:
    """None (everything) for admins; others see their own events and unowned ones."""
    if principal.role == "admin":
        return None
    name = principal.name
    return lambda e: e.owner is None or e.owner == name


def check_workflow_id(value: object, param: str = "workflow_id") -> str:
    if not isinstance(value, str) or not WORKFLOW_ID.fullmatch(value):
        raise BadRequest(f"{param} must be 1-128 characters of A-Z a-z 0-9 . _ : -",
                         param=param)
    return value


def check_after(value: object, param: str = "after") -> str | None:
    if value is None or value == "":
        return None
    if not is_id(value):
        raise BadRequest(f"{param} must be an event id such as 1732623000000-0", param=param)
    assert isinstance(value, str)
    return value


_FRAMES: dict[str, tuple[Event, bytes]] = {}
_FRAMES_MAX = 1024


def frame(event: Event) -> bytes:
    """The event's JSON, serialised once for all its subscribers (fewer allocations per
    frame mean fewer and shorter garbage collections on the loop)."""
    eid = event.id
    if eid is None:
        return orjson.dumps(event.to_json())
    hit = _FRAMES.get(eid)
    if hit is not None and hit[0] is event:
        return hit[1]
    data = orjson.dumps(event.to_json())
    if len(_FRAMES) >= _FRAMES_MAX:
        del _FRAMES[next(iter(_FRAMES))]  # oldest first: dicts keep insertion order
    _FRAMES[eid] = (event, data)
    return data


def _bus(request: web.Request) -> tuple[BusBase, EventsConfig]:
    state = request.app[STATE]
    bus = getattr(state, "events", None)
    if bus is None:
        raise Unavailable("the event bus is not running", retry_after=5)
    return bus, state.config.events


async def _check_visible(bus: BusBase, workflow_id: str, accept: Accept | None
                         ) -> Event | None:
    """The workflow's latest event; 404 when it belongs to someone the caller may not see
    (a workflow without events yet cannot be told apart and is streamed, filtered)."""
    last = await bus.last(workflow_id)
    if last is not None and accept is not None and not accept(last):
        raise NotFound(f"no workflow {workflow_id!r}", code="workflow_not_found")
    return last


def _observe(metrics: EventMetrics, transport: str, sub: Subscription, event: Event) -> None:
    delivered, lag = metrics.transport(transport)
    delivered.inc()
    if event.type != GAP and not sub.historic:
        lag.observe(max(0.0, time.time() - event.ts))


class _Bucket:
    """Client message rate: ``rate`` per second, bursts of two seconds' worth."""

    def __init__(self, rate: float) -> None:
        self.rate, self.cap = rate, max(1.0, rate * 2)
        self.tokens, self.t = self.cap, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# ---- websocket ---------------------------------------------------------------------------


class WsSession:
    """One websocket: its subscriptions (one pump task each), a send lock and its limits."""

    def __init__(self, request: web.Request, bus: BusBase, cfg: EventsConfig) -> None:
        self.request, self.bus, self.cfg = request, bus, cfg
        self.metrics = bus.metrics
        self.accept = visibility(principal_of(request))
        self.ws = web.WebSocketResponse(heartbeat=cfg.heartbeat_s,
                                        max_msg_size=cfg.ws_max_message_bytes)
        self.pumps: dict[str | None, tuple[Subscription, asyncio.Task[None]]] = {}
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.sending_since = 0.0  # loop time a send began that has not finished; 0: idle
        self.close_code: int | None = None
        self.close_reason = ""
        self.done = asyncio.Event()

    async def send(self, data: bytes) -> None:
        """One frame. A send stuck on a client that reads nothing is aborted by the app's
        watchdog after ``send_timeout_s`` (no timer per frame: this is the hot path)."""
        async with self._lock:
            self.sending_since = self._loop.time()
            try:
                await self.ws.send_str(data.decode())
            finally:
                self.sending_since = 0.0

    def tick(self, now: float) -> None:
        """Called by the watchdog about once a second."""
        if self.sending_since and now - self.sending_since > self.cfg.send_timeout_s:
            self.finish(CLOSE_SLOW, "client did not read in time")
            transport = self.request.transport
            if transport is not None:
                transport.abort()  # the stuck write fails at once

    async def control(self, kind: str, **fields: Any) -> None:
        await self.send(orjson.dumps({"type": kind, **fields}))

    def finish(self, code: int, reason: str) -> None:
        """Ask the handler to close the socket (first reason wins)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.done.set()

    def stop(self) -> None:  # daemon shutdown
        self.finish(WSCloseCode.GOING_AWAY, "daemon shutting down")

    def open(self, workflow_id: str | None, after: str | None) -> Subscription:
        accept = self.accept
        if workflow_id is None:
            # the all-events subscription leaves workflows with their own to those
            own, base = self.pumps, self.accept

            def accept_all(e: Event) -> bool:
                return e.workflow_id not in own and (base is None or base(e))
            accept = accept_all
        sub = self.bus.subscribe(workflow_id, after, accept)
        old = self.pumps.pop(workflow_id, None)
        if old is not None:
            old[0].close()
            old[1].cancel()
        task = asyncio.create_task(self._pump(sub, workflow_id))
        self.pumps[workflow_id] = (sub, task)
        return sub

    def drop(self, workflow_id: str | None) -> bool:
        entry = self.pumps.pop(workflow_id, None)
        if entry is None:
            return False
        entry[0].close()
        entry[1].cancel()
        return True

    async def _pump(self, sub: Subscription, workflow_id: str | None) -> None:
        try:
            async for event in sub:
                await self.send(frame(event))
                _observe(self.metrics, "ws", sub, event)
                if workflow_id is not None and event.type in TERMINAL:
                    self.on_terminal(workflow_id)
                    return
            self.finish(WSCloseCode.GOING_AWAY, "event stream ended")  # the bus closed
        except SlowConsumer as exc:
            self.finish(CLOSE_SLOW, exc.message[:120])
        except CitadelError as exc:  # history unreachable (Redis down)
            self.finish(CLOSE_UNAVAILABLE, exc.message[:120])
        except ConnectionError:  # the client is gone (or was cut off by the watchdog)
            self.finish(CLOSE_SLOW, "connection lost")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event stream failed")
            self.finish(WSCloseCode.INTERNAL_ERROR, "internal error")
        finally:
            sub.close()

    def on_terminal(self, workflow_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for sub, task in list(self.pumps.values()):
            sub.close()
            task.cancel()
        self.pumps.clear()
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.ws.close(code=self.close_code or WSCloseCode.OK,
                                  message=self.close_reason.encode()), 2.0)


class WorkflowWs(WsSession):
    def on_terminal(self, workflow_id: str) -> None:
        self.pumps.pop(workflow_id, None)
        self.finish(WSCloseCode.OK, "workflow finished")


class AllWs(WsSession):
    def on_terminal(self, workflow_id: str) -> None:
        self.pumps.pop(workflow_id, None)
        task = asyncio.create_task(self.control("unsubscribed", workflow_id=workflow_id,
                                                reason="finished"))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def on_message(self, raw: str) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.control("error", code="invalid_json", message="message is not JSON")
            return
        err = _check_message(msg)
        if err is not None:
            await self.control("error", code="invalid_message", message=err)
            return
        kind, wf = msg["type"], msg.get("workflow_id")
        if kind == "ping":
            await self.control("pong")
        elif kind == "unsubscribe":
            found = self.drop(wf)
            await self.control("unsubscribed", workflow_id=wf, found=found)
        else:
            if wf not in self.pumps and len(self.pumps) >= self.cfg.ws_max_subscriptions:
                await self.control("error", code="too_many_subscriptions",
                                   message=f"at most {self.cfg.ws_max_subscriptions} "
                                           "subscriptions per connection", workflow_id=wf)
                return
            try:
                self.open(wf, msg.get("after"))
            except CitadelError as exc:
                await self.control("error", code=exc.code, message=exc.message,
                                   workflow_id=wf)
                return
            await self.control("subscribed", workflow_id=wf, after=msg.get("after"))


_MESSAGE_KEYS = {"type", "workflow_id", "after", "id"}


def _check_message(msg: object) -> str | None:
    """None when ``msg`` is a valid client message, else what is wrong with it."""
    if not isinstance(msg, dict):
        return "message must be a JSON object"
    kind = msg.get("type")
    if kind not in ("subscribe", "unsubscribe", "ping"):
        return "type must be subscribe, unsubscribe or ping"
    extra = set(msg) - _MESSAGE_KEYS
    if extra:
        return f"unknown field(s): {', '.join(sorted(extra))[:100]}"
    wf = msg.get("workflow_id")
    if wf is not None and (not isinstance(wf, str) or not WORKFLOW_ID.fullmatch(wf)):
        return "workflow_id must be null or 1-128 characters of A-Z a-z 0-9 . _ : -"
    after = msg.get("after")
    if after is not None and (kind != "subscribe" or not is_id(after)):
        return "after must be an event id such as 1732623000000-0 (subscribe only)"
    return None


async def _serve_ws(request: web.Request, session: WsSession) -> web.WebSocketResponse:
    ws = session.ws
    sessions = request.app.get(_SESSIONS)
    if sessions is not None:
        sessions.add(session)
    bucket = _Bucket(session.cfg.ws_max_messages_per_s)

    async def read() -> None:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if not bucket.take():
                    session.finish(WSCloseCode.POLICY_VIOLATION, "too many messages")
                    return
                if isinstance(session, AllWs):
                    await session.on_message(msg.data)
                else:
                    await session.control("error", code="unsupported",
                                          message="this stream takes no messages")
            elif msg.type is WSMsgType.BINARY:
                await session.control("error", code="unsupported_data",
                                      message="send JSON text frames")
            elif msg.type is WSMsgType.ERROR:  # e.g. a frame over max_msg_size: 1009 sent
                return
        session.finish(WSCloseCode.OK, "")

    reader = asyncio.create_task(read())
    waiter = asyncio.create_task(session.done.wait())
    try:
        await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        await session.close()
    return ws


@own_deadline
async def ws_workflow(request: web.Request) -> web.StreamResponse:
    bus, cfg = _bus(request)
    wf = check_workflow_id(request.match_info["workflow_id"], "id")
    after = check_after(request.query.get("after"))
    session = WorkflowWs(request, bus, cfg)
    await _check_visible(bus, wf, session.accept)
    session.open(wf, after)  # 400/404/503 before the upgrade
    try:
        await session.ws.prepare(request)
    except BaseException:
        await session.close()
        raise
    return await _serve_ws(request, session)


@own_deadline
async def ws_all(request: web.Request) -> web.StreamResponse:
    bus, cfg = _bus(request)
    after = check_after(request.query.get("after"))
    session = AllWs(request, bus, cfg)
    if request.query.get("subscribe", "all") != "none":
        session.open(None, after)
    try:
        await session.ws.prepare(request)
    except BaseException:
        await session.close()
        raise
    return await _serve_ws(request, session)


# ---- SSE ---------------------------------------------------------------------------------


class SseSession:
    """One SSE response: writes, stall detection and heartbeat comments (by the watchdog)."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, sub: Subscription,
                 cfg: EventsConfig) -> None:
        self.request, self.resp, self.sub, self.cfg = request, resp, sub, cfg
        self._loop = asyncio.get_running_loop()
        self.sending_since = 0.0
        self.last_write = self._loop.time()
        self._ping: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self.sending_since = self._loop.time()
        try:
            await self.resp.write(data)
        finally:
            self.last_write = self._loop.time()
            self.sending_since = 0.0

    def tick(self, now: float) -> None:
        if self.sending_since and now - self.sending_since > self.cfg.send_timeout_s:
            self.sub.close()
            transport = self.request.transport
            if transport is not None:
                transport.abort()
        elif (not self.sending_since and now - self.last_write >= self.cfg.heartbeat_s
              and (self._ping is None or self._ping.done()) and self.resp.prepared):
            self._ping = asyncio.create_task(self._send_ping())

    async def _send_ping(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.write(b": ping\n\n")

    def stop(self) -> None:  # daemon shutdown: the stream ends, the client reconnects elsewhere
        self.sub.close()


def sse_event(event: Event) -> bytes:
    head = b"" if event.type == GAP or event.id is None else b"id: " + event.id.encode() + b"\n"
    return head + b"data: " + frame(event) + b"\n\n"


@own_deadline
async def sse(request: web.Request) -> web.StreamResponse:
    bus, cfg = _bus(request)
    raw_wf = request.query.get("workflow_id")
    wf = check_workflow_id(raw_wf) if raw_wf is not None else None
    header = request.headers.get("Last-Event-ID")
    after = check_after(header, "Last-Event-ID") if header else check_after(
        request.query.get("after"))
    accept = visibility(principal_of(request))
    if wf is not None:
        last = await _check_visible(bus, wf, accept)
        if (after is not None and last is not None and last.type in TERMINAL
                and last.id is not None and parse_id(last.id) <= parse_id(after)):
            return web.Response(status=204)  # finished and seen: EventSource stops here
    sub = bus.subscribe(wf, after, accept)
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    session = SseSession(request, resp, sub, cfg)
    sessions = request.app.get(_SESSIONS)
    if sessions is not None:
        sessions.add(session)
    metrics = bus.metrics
    try:
        await resp.prepare(request)
        await session.write(f"retry: {SSE_RETRY_MS}\n: connected\n\n".encode())
        try:
            async for event in sub:
                await session.write(sse_event(event))
                _observe(metrics, "sse", sub, event)
                if wf is not None and event.type in TERMINAL:
                    break
        except CitadelError as exc:  # slow consumer, history unreachable
            body = orjson.dumps({"type": "error", "code": exc.code, "message": exc.message})
            await session.write(b"event: error\ndata: " + body + b"\n\n")
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
    except ConnectionError:  # the client went away, or stopped reading and was cut off
        return resp
    finally:
        sub.close()
        if session._ping is not None:
            session._ping.cancel()


async def _watchdog(app: web.Application) -> None:
    """Once a tick: cut writes stuck on clients that read nothing, send SSE heartbeats."""
    cfg = app[STATE].config.events
    step = min(1.0, cfg.heartbeat_s / 2, cfg.send_timeout_s / 2)
    loop = asyncio.get_running_loop()
    sessions = app[_SESSIONS]
    while True:
        await asyncio.sleep(step)
        now = loop.time()
        for session in list(sessions):
            try:
                session.tick(now)
            except Exception:  # one odd session must not stop the others' watchdog
                log.exception("event stream watchdog")


_WATCHDOG: web.AppKey[asyncio.Task[None]] = web.AppKey("citadel_event_watchdog", asyncio.Task)


async def _start_watchdog(app: web.Application) -> None:
    app[_WATCHDOG] = asyncio.create_task(_watchdog(app), name="event-stream-watchdog")


async def _stop_watchdog(app: web.Application) -> None:
    task = app.get(_WATCHDOG)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _on_shutdown(app: web.Application) -> None:
    sessions = app.get(_SESSIONS)
    for session in list(sessions or ()):
        session.stop()


def add_routes(app: web.Application) -> None:
    app[_SESSIONS] = weakref.WeakSet()
    app.on_startup.append(_start_watchdog)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_stop_watchdog)
    app.router.add_get("/ws", ws_all)
    app.router.add_get("/ws/workflows/{workflow_id}", ws_workflow)
    app.router.add_get("/api/v1/events", sse)
