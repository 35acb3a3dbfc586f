"""Start the real `citadeld` process for end-to-end tests and bench scripts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProc:
    """One citadeld child process with its own config file and log file."""

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
                 ) -> None:
        self.port = free_port()
        config = dict(config)
        config.setdefault("server", {})
        config["server"] = {**config["server"], "listen": f"127.0.0.1:{self.port}"}
        config.setdefault("state_dir", str(workdir / "state"))
        # one admin socket per daemon: the default (/run/citadel as root) is shared by all
        config["admin"] = {"socket": str(workdir / f"admin-{self.port}.sock"),
                           **config.get("admin", {})}
        self.admin_socket = str(config["admin"]["socket"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"citadel-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"citadeld-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 90.0, require_ready: bool = True) -> DaemonProc:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "citadeld.main", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + ready_timeout
        path = "/health/ready" if require_ready else "/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"citadeld exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"citadeld not ready after {ready_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def logs(self, settle: float = 1.0) -> str:
        """The log so far. A running daemon flushes info lines at least every 0.5 s, so wait
        `settle` seconds first for lines of what just happened."""
        if settle and self.proc is not None and self.proc.poll() is None:
            time.sleep(settle)
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)
