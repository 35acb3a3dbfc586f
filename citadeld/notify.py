"""sd_notify(3) in pure Python: datagrams to ``$NOTIFY_SOCKET``, no libsystemd.

systemd passes the socket path in ``NOTIFY_SOCKET``: a filesystem path, or an abstract socket
written with a leading ``@`` (the kernel's leading NUL byte). Every message is one datagram of
newline-separated ``KEY=VALUE`` lines. Without ``NOTIFY_SOCKET`` (not started by systemd, or
``Type=simple``) every call is a cheap no-op, so callers never need to check.

The watchdog: systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the unit has
``WatchdogSec=``; the daemon must send ``WATCHDOG=1`` more often than that, and only while it is
really healthy (see :mod:`citadeld.admin.lifecycle`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("citadeld.notify")


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_usec(env: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """The watchdog interval systemd asks for, or None (no watchdog, or meant for another pid)."""
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec


class Notifier:
    """One per process; thread-safe enough (each send is one sendto on its own socket)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_usec = watchdog_usec(env)
        self.sent: list[str] = []  # the last messages, for tests and `status`
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def send(self, *lines: str, **fields: object) -> bool:
        """Send one datagram; returns whether it went out. Never raises."""
        parts = [*lines, *(f"{k}={v}" for k, v in fields.items())]
        if not parts or self.path is None:
            return False
        # a newline inside a value would start a new assignment: flatten it
        msg = "\n".join(p.replace("\n", " ") for p in parts)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(msg.encode(), _address(self.path))
        except OSError as exc:
            self.errors += 1
            if self.errors <= 3 or self.errors % 100 == 0:
                log.warning("sd_notify failed", extra={"socket": self.path, "error": str(exc)})
            return False
        self.sent = [*self.sent[-31:], msg]
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self, status: str = "reloading configuration") -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={status}")

    def stopping(self, status: str = "draining") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self, reason: str) -> bool:
        """Ask systemd to treat us as hung now (it applies the unit's watchdog action)."""
        return self.send("WATCHDOG=trigger", f"STATUS=watchdog: {reason}")
