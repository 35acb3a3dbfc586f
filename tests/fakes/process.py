"""Run a fake as a subprocess, for e2e tests and bench scripts.

A separate process keeps the fake's CPU (JSON, vectors, the model) off the daemon's event loop
and the test process's GIL, and lets benchmarks measure the daemon alone. The fake prints
``LISTENING <port>`` once bound; we wait for that line, so no port is guessed and no startup
sleep is needed. The child holds our end of a stdin pipe and exits when it closes, so a killed
test run leaves no orphan server behind.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]


def _drain(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Read stdout until EOF, so a chatty child can never block on a full pipe."""
    try:
        for line in stream:
            lines.put(line)
    except (ValueError, OSError):  # closed by stop_fake while we were reading
        pass
    lines.put(None)


def start_fake(
    module: str, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m <module> <args>`` and return (process, bound port).

    ``module`` may be short (``"ollama"``, ``"openai_compat"``). ``--port 0`` is added when no
    port is given. The timeout covers the model preload (importing torch takes seconds); pass
    ``--fake-vectors hash`` or ``--no-preload`` for a fast start.
    """
    if "." not in module:
        module = f"tests.fakes.{module}"
    argv = [str(a) for a in args]
    if "--port" not in argv:
        argv += ["--port", "0"]
    argv.append("--exit-on-stdin-eof")
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=REPO_ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.01))
        except queue.Empty:
            stop_fake(proc)
            raise TimeoutError(f"{module} did not print LISTENING within {timeout}s") from None
        if line is None:
            code = proc.wait()
            raise RuntimeError(f"{module} exited with {code} before listening")
        if line.startswith("LISTENING "):
            return proc, int(line.split()[1])


def start_fake_background(
    module: str, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> Future[tuple[subprocess.Popen[str], int]]:
    """``start_fake`` without waiting: start a model-loading fake early, collect it later."""
    future: Future[tuple[subprocess.Popen[str], int]] = Future()

    def run() -> None:
        try:
            future.set_result(start_fake(module, *args, timeout=timeout, env=env))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=f"start-{module}", daemon=True).start()
    return future


def stop_fake(proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
    """SIGTERM (graceful stop), then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    return proc.returncode
