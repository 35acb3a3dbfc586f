"""A lean pipelined Redis connection for the rate limiter's one-command-per-request traffic.

redis-py's asyncio client costs ~100 us of event-loop CPU per call (a pipeline object, a pool
checkout, a ``wait_for`` task per read, reply callbacks) - more than everything else a cached
embedding request does. Here one connection is an ``asyncio.Protocol``: commands of one loop
tick go out in one write, replies are parsed by hiredis (the C parser redis-py itself uses when
installed) straight from ``data_received`` and matched to their futures in order (Redis answers
a connection's commands in the order sent). URLs are parsed by redis-py, so ``redis://``,
``rediss://`` and ``unix://`` with user, password and db mean what they mean everywhere else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis

ReplyError = hiredis.ReplyError


def encode(*args: bytes | str | int | float) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not self._waiters:
                self.close(ConnectionError("Redis sent a reply nobody asked for"))
                return
            fut = self._waiters.popleft()
            if not fut.done():  # a caller that timed out is gone; the order still holds
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("Redis closed the connection"))

    # -- use --

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one encoded command; this tick's commands are written together."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionError("connection closed"))
            return fut
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(command)
        self._waiters.append(fut)
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def close(self, exc: BaseException | None = None) -> None:
        if self._transport is not None:
            self._transport.abort()  # a hung Redis must not keep unread replies around
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._out.clear()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: nobody may be waiting any more


async def connect(url: str, client_name: str) -> RespConnection:
    """Open, authenticate, select the db. Bound it with the caller's timeout."""
    from redis.connection import SSLConnection, parse_url

    kw: dict[str, Any] = parse_url(url)
    loop = asyncio.get_running_loop()
    conn: RespConnection
    if "path" in kw:
        _, conn = await loop.create_unix_connection(RespConnection, kw["path"])
    else:
        ssl = True if kw.get("connection_class") is SSLConnection else None
        _, conn = await loop.create_connection(RespConnection, kw.get("host", "localhost"),
                                               int(kw.get("port", 6379)), ssl=ssl)
    try:
        hello: list[asyncio.Future[Any]] = []
        if kw.get("password"):
            args = [kw["username"], kw["password"]] if kw.get("username") else [kw["password"]]
            hello.append(conn.request(encode("AUTH", *args)))
        if int(kw.get("db") or 0):
            hello.append(conn.request(encode("SELECT", int(kw["db"]))))
        hello.append(conn.request(encode("CLIENT", "SETNAME", client_name)))
        for reply in await asyncio.gather(*hello):
            if isinstance(reply, ReplyError):
                raise reply
    except BaseException:
        conn.close()
        raise
    return conn
