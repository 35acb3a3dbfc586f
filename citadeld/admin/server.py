"""The admin socket: a Unix stream socket on the daemon's event loop, NDJSON, peer-checked.

The socket file is mode 0660 (``admin.mode``) and belongs to the daemon's group (or
``admin.group``); on top of the file permissions every connection's peer credentials
(SO_PEERCRED, SO_PEERGROUPS) are checked: root, the daemon's own user, or a member of the
socket's group. Every request has a deadline (the command's timeout, else ``admin.timeout_s``)
and an idle connection is closed after ``admin.idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import inspect
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from citadeld.admin import commands as _builtin  # noqa: F401 - registers the built-in commands
from citadeld.admin.protocol import (
    BAD_REQUEST,
    CONFIRMATION_REQUIRED,
    FORBIDDEN,
    INTERNAL,
    MAX_LINE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    TIMEOUT,
    UNSUPPORTED_VERSION,
    AdminError,
    decode,
    encode,
)
from citadeld.admin.registry import DEFAULT_TIMEOUT_S, REGISTRY, AdminContext, Registry
from citadeld.llm import admin_commands as _breakers  # noqa: F401 - registers `breakers ...`
from citadeld.security import admin_commands as _keys  # noqa: F401 - registers `keys ...`
from citadeld.security import audit_admin as _audit  # noqa: F401 - registers `audit tail`

if TYPE_CHECKING:
    from citadeld.admin.lifecycle import Lifecycle
    from citadeld.state import DaemonState

log = logging.getLogger("citadeld.admin")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


class AdminSocketError(RuntimeError):
    """The socket cannot be bound (in use by a live daemon, bad path, permissions)."""


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


def peer_credentials(sock: Any) -> PeerCred:
    """The connecting process's pid/uid/gid and supplementary groups, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4])
    except OSError:  # old kernel: fall back to /proc (hidden by ProtectProc=invisible)
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        groups = tuple(int(g) for g in line.split()[1:])
    return PeerCred(pid, uid, gid, groups)


class AdminServer:
    def __init__(
        self,
        path: str,
        state: DaemonState,
        lifecycle: Lifecycle | None = None,
        *,
        registry: Registry | None = None,
        mode: int = 0o660,
        group: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.path = path
        self.state = state
        self.lifecycle = lifecycle
        self.registry = registry or REGISTRY
        self.mode = mode
        self.group = group
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.socket_gid: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    # ---- binding ----------------------------------------------------------------------------

    def _bind_socket(self) -> socket.socket:
        parent = os.path.dirname(self.path) or "."
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o750, exist_ok=True)
            except OSError as exc:
                raise AdminSocketError(f"cannot create {parent}: {exc.strerror}") from None
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise AdminSocketError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # stale: its daemon is gone
            else:
                raise AdminSocketError(
                    f"{self.path} is in use by another running citadeld")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            # bound with the umask's (stricter or equal) mode first, then opened to the group
            if self.group:
                try:
                    gid = grp.getgrnam(self.group).gr_gid
                except KeyError:
                    raise AdminSocketError(f"admin.group {self.group!r} does not exist") from None
                os.chown(self.path, -1, gid)
            os.chmod(self.path, self.mode)
            sock.listen(64)
            sock.setblocking(False)
        except AdminSocketError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            msg = exc.strerror or str(exc)
            if exc.errno == errno.EINVAL or len(self.path.encode()) > 107:
                msg = f"{msg} (a socket path is at most 107 bytes)"
            raise AdminSocketError(f"cannot bind {self.path}: {msg}") from None
        st = os.stat(self.path)
        self.socket_gid = st.st_gid
        self._inode = (st.st_dev, st.st_ino)
        return sock

    async def start(self) -> None:
        sock = self._bind_socket()
        self._server = await asyncio.start_unix_server(
            self._on_connection, sock=sock, limit=MAX_LINE)
        log.info("admin socket listening", extra={"socket": self.path,
                                                   "mode": oct(self.mode), "gid": self.socket_gid})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # never remove a successor's socket
                os.unlink(self.path)

    # ---- connections ------------------------------------------------------------------------

    def allowed(self, peer: PeerCred) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        gid = self.socket_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            sock = writer.get_extra_info("socket")
            try:
                peer = peer_credentials(sock)
            except OSError as exc:
                log.warning("admin: no peer credentials", extra={"error": str(exc)})
                return
            if not self.allowed(peer):
                log.warning("admin: connection refused", extra=peer.as_dict())
                # read the request first: closing on unread data resets the connection, and the
                # client could lose the answer that says why
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readline(), 2.0)
                writer.write(encode(_error_answer(None, AdminError(
                    f"uid {peer.uid} may not use this socket (root, the daemon's user or group "
                    f"{self.socket_gid} only)", FORBIDDEN))))
                await writer.drain()
                return
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: PeerCred) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle_timeout_s)
            except TimeoutError:
                return
            except ValueError:  # longer than MAX_LINE
                writer.write(encode(_error_answer(None, AdminError(
                    f"request longer than {MAX_LINE} bytes", BAD_REQUEST))))
                await writer.drain()
                return
            if not line:
                return
            if not line.strip():
                continue
            answer = await self.handle_line(line, peer)
            writer.write(encode(answer))
            await writer.drain()

    async def handle_line(self, line: bytes, peer: PeerCred | None = None) -> dict[str, Any]:
        try:
            req = decode(line)
        except Exception:
            return _error_answer(None, AdminError("request is not valid JSON", BAD_REQUEST))
        if not isinstance(req, dict):
            return _error_answer(None, AdminError("request must be a JSON object", BAD_REQUEST))
        rid = req.get("id")
        version = req.get("v", PROTOCOL_VERSION)
        if version not in SUPPORTED_VERSIONS:
            return _error_answer(rid, AdminError(
                f"protocol version {version!r} is not supported", UNSUPPORTED_VERSION,
                supported=list(SUPPORTED_VERSIONS)))
        t0 = time.perf_counter()
        name = None
        try:
            cmd, args = self._resolve(req)
            name = cmd.name
            if cmd.mutating and req.get("confirm") is not True:
                raise AdminError(f"{cmd.name} changes the running daemon: confirm with --yes",
                                 CONFIRMATION_REQUIRED, ask=cmd.ask)
            ctx = AdminContext(self.state, self.lifecycle, self.registry,
                               peer.as_dict() if peer else {})
            timeout = cmd.timeout if cmd.timeout is not None else self.timeout_s
            try:
                async with asyncio.timeout(timeout):
                    result = cmd.handler(ctx, args)
                    if inspect.isawaitable(result):
                        result = await result
            except TimeoutError:
                raise AdminError(f"{cmd.name} did not finish within {timeout} s", TIMEOUT
                                 ) from None
        except AdminError as exc:
            return _error_answer(rid, exc, name)
        except Exception as exc:
            log.exception("admin command failed", extra={"command": name})
            return _error_answer(rid, AdminError(f"{type(exc).__name__}: {exc}", INTERNAL), name)
        finally:
            if name is not None:
                extra = {"command": name, "ms": round((time.perf_counter() - t0) * 1000, 2),
                         **(peer.as_dict() if peer else {})}
                level = logging.INFO if self._mutating(name) else logging.DEBUG
                log.log(level, "admin command", extra=extra)
        return {"v": PROTOCOL_VERSION, "id": rid, "ok": True, "cmd": name, "result": result}

    def _mutating(self, name: str) -> bool:
        cmd = self.registry.get(name)
        return cmd is not None and cmd.mutating

    def _resolve(self, req: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        named = req.get("args") or {}
        if not isinstance(named, dict):
            raise AdminError("args must be an object", BAD_REQUEST)
        if "words" in req:
            words = req["words"]
            if not isinstance(words, list) or not words or not all(
                    isinstance(w, str) for w in words):
                raise AdminError("words must be a non-empty list of strings", BAD_REQUEST)
            cmd, rest = self.registry.resolve(words)
            return cmd, cmd.bind(rest, named)
        name = req.get("cmd")
        if not isinstance(name, str) or not name:
            raise AdminError("request needs cmd (or words)", BAD_REQUEST)
        cmd, rest = self.registry.resolve(name.split())
        return cmd, cmd.bind(rest, named)


def _error_answer(rid: Any, exc: AdminError, name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "ok": False,
                           "error": exc.to_json()}
    if name is not None:
        out["cmd"] = name
    return out
