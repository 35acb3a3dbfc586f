"""A stand-in for systemd's notify socket: collects sd_notify datagrams for tests."""

from __future__ import annotations

import socket
import threading
import time
import uuid


class NotifyListener:
    """An abstract datagram socket standing in for systemd's notify socket."""

    def __init__(self) -> None:
        self.name = f"citadel-test-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(
                line.split("=", 1) for line in data.decode().split("\n") if "=" in line))

    def wait_for(self, key: str, value: str | None = None, after: int = 0,
                 timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.messages[after:]:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value} among {self.messages[after:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
