"""A blocking admin-socket client (citadelctl, tests, scripts). One connection per call."""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

from citadeld.admin.protocol import MAX_LINE, PROTOCOL_VERSION, decode, encode

_ids = itertools.count(1)


class ClientError(Exception):
    """Cannot talk to the daemon at all (not running, permission, timeout, garbage)."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind  # unreachable | timeout | protocol


def call(path: str, *, cmd: str | None = None, words: list[str] | None = None,
         args: dict[str, Any] | None = None, confirm: bool = False,
         timeout: float = 60.0) -> dict[str, Any]:
    """Send one request, return the daemon's answer object (``ok`` true or false)."""
    req: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": next(_ids) + os.getpid() * 1000}
    if words is not None:
        req["words"] = words
    else:
        req["cmd"] = cmd
    if args:
        req["args"] = args
    if confirm:
        req["confirm"] = True
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout, 5.0))
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ClientError(f"cannot connect to {path}: no such socket "
                              "(is citadeld running?)") from None
        except ConnectionRefusedError:
            raise ClientError(f"cannot connect to {path}: connection refused "
                              "(citadeld is not running)") from None
        except PermissionError:
            raise ClientError(f"cannot connect to {path}: permission denied (run as root or "
                              "as a member of the socket's group, e.g. citadel)") from None
        except TimeoutError:
            raise ClientError(f"cannot connect to {path}: timed out", "timeout") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(encode(req))
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"no answer from {path} within {timeout:g} s", "timeout")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ClientError(f"no answer from {path} within {timeout:g} s",
                                  "timeout") from None
            except OSError as exc:
                raise ClientError(f"connection to {path} failed: {exc.strerror or exc}") from None
            if not chunk:
                raise ClientError(f"{path}: the daemon closed the connection without answering",
                                  "protocol")
            buf += chunk
            if len(buf) > MAX_LINE * 16:
                raise ClientError(f"{path}: answer too long", "protocol")
    finally:
        sock.close()
    try:
        answer = decode(buf)
    except Exception:
        raise ClientError(f"{path}: answer is not JSON", "protocol") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ClientError(f"{path}: answer is not an admin-protocol object", "protocol")
    return answer
