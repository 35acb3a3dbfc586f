"""sd_notify in pure Python: datagrams to filesystem and abstract sockets, watchdog settings."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from citadeld.notify import Notifier, monotonic_usec, watchdog_usec


def _receiver(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(2)
    return s


@pytest.fixture
def fs_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    s = _receiver(path)
    yield path, s
    s.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_status_to_a_filesystem_socket(fs_socket: tuple[str, socket.socket]) -> None:
    path, rx = fs_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving\non two lines")
    got = fields(rx.recv(4096))
    assert got["READY"] == "1"
    assert got["MAINPID"] == str(os.getpid())
    assert got["STATUS"] == "serving on two lines"  # a newline would start a new assignment
    assert n.status("busy")
    assert fields(rx.recv(4096)) == {"STATUS": "busy"}


def test_abstract_socket_reloading_and_stopping() -> None:
    name = f"citadel-test-{uuid.uuid4().hex}"
    rx = _receiver(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        before = monotonic_usec()
        assert n.reloading()
        got = fields(rx.recv(4096))
        assert got["RELOADING"] == "1"
        assert before <= int(got["MONOTONIC_USEC"]) <= monotonic_usec()
        assert n.stopping("draining")
        assert fields(rx.recv(4096)) == {"STOPPING": "1", "STATUS": "draining"}
        assert n.watchdog()
        assert fields(rx.recv(4096)) == {"WATCHDOG": "1"}
    finally:
        rx.close()


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    assert abs(monotonic_usec() - time.monotonic() * 1e6) < 1e6


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_usec is None


def test_a_dead_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.ready() is False
    assert n.errors == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_usec(env: dict[str, str], expected: int | None) -> None:
    assert watchdog_usec(env) == expected
