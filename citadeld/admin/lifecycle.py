"""The daemon's operational life around the serving core: admin socket, sd_notify, reload,
drain/undrain, the systemd watchdog and the STATUS= line.

``Daemon.run`` (runtime.py) drives it:

* ``await start()``     binds the admin socket (False: cannot, the daemon exits 69)
* ``await ready(fut)``  once HTTP is bound and the supervision tree started: READY=1, tasks
* ``reload(source)``    SIGHUP and ``citadelctl reload``: RELOADING=1 ... READY=1
* ``stopping()``        SIGTERM: STOPPING=1
* ``await stop()``      closes the admin socket, ends the tasks

The watchdog (``WatchdogSec=`` in the unit) is fed only while the daemon is really well: the
loop's own wake-up lag is sane, the root supervisor has not escalated, every supervisor thread
runs a probe job, and the actors answer a Ping (all silent = the actor system is wedged; a single
slow or hung actor is its supervisor's job, which replaces it). Withholding WATCHDOG=1 makes
systemd kill and restart a wedged daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import pykka

from citadeld.admin import reload as reloading
from citadeld.admin.paths import default_socket_path
from citadeld.admin.protocol import FAILED, UNAVAILABLE, AdminError
from citadeld.admin.server import AdminServer, AdminSocketError
from citadeld.config import ConfigError, load_config
from citadeld.notify import Notifier
from citadeld.supervision import Ping, SupervisedActor

if TYPE_CHECKING:
    from aiohttp import web

    from citadeld.runtime import Daemon
    from citadeld.state import DaemonState

log = logging.getLogger("citadeld.lifecycle")

STATUS_EVERY_S = 10.0


class Lifecycle:
    def __init__(self, daemon: Daemon, state: DaemonState,
                 runner: web.AppRunner | None = None, notifier: Notifier | None = None) -> None:
        self.daemon = daemon
        self.state = state
        self.runner = runner
        self.notifier = notifier or Notifier()
        self.config_path: str | None = getattr(daemon, "config_path", None)
        self.overrides: dict[str, Any] = dict(getattr(daemon, "config_overrides", None) or {})
        self.admin: AdminServer | None = None
        self.shutting_down = False
        self.admin_drained = False
        self.pending_restart: dict[str, str] = {}
        self.last_reload: dict[str, Any] | None = None
        self.watchdog: dict[str, Any] = {"enabled": self.notifier.watchdog_usec is not None,
                                         "interval_s": None, "last_ok": None, "withheld": None}
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_status = ""
        state.extra["lifecycle"] = self

    # ---- start / stop -----------------------------------------------------------------------

    async def start(self) -> bool:
        acfg = getattr(self.state.config, "admin", None)
        if acfg is not None and not acfg.enabled:
            return True
        path = (acfg.socket if acfg is not None else None) or default_socket_path()
        kw: dict[str, Any] = {}
        if acfg is not None:
            kw = dict(mode=int(acfg.mode, 8), group=acfg.group, timeout_s=acfg.timeout_s)
        self.admin = AdminServer(path, self.state, self, **kw)
        try:
            await self.admin.start()
        except AdminSocketError as exc:
            log.critical("cannot open the admin socket", extra={"socket": path,
                                                                 "error": str(exc)})
            self.admin = None
            return False
        return True

    async def ready(self, started: concurrent.futures.Future[Any] | None = None) -> None:
        if started is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(started), 30)
        loop = asyncio.get_running_loop()
        self.notifier.ready(self.status_line())
        self._tasks.append(loop.create_task(self._status_loop(), name="sd-status"))
        usec = self.notifier.watchdog_usec
        if usec is not None:
            interval = max(0.2, usec / 1e6 / 3)
            self.watchdog["interval_s"] = round(interval, 3)
            self._tasks.append(loop.create_task(self._watchdog_loop(interval), name="watchdog"))
            log.info("systemd watchdog enabled", extra={"interval_s": round(interval, 3)})

    def stopping(self) -> None:
        self.shutting_down = True
        self.notifier.stopping(f"draining (up to {self.state.config.server.drain_timeout_s:g} s)")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.admin is not None:
            await self.admin.stop()

    # ---- STATUS= ----------------------------------------------------------------------------

    def status_line(self) -> str:
        pools = self.state.pools
        ready = sum(1 for p in pools.values() if p.can_embed())
        parts = [f"serving on {self.state.config.server.listen}",
                 f"models ready {ready}/{len(pools)}"]
        queued = sum(p.queue_depth for p in pools.values())
        if queued:
            parts.append(f"{queued} queued")
        if self.shutting_down:
            parts.append("shutting down")
        elif self.state.draining:
            parts.append("draining (citadelctl undrain to resume)")
        if self.pending_restart:
            parts.append(f"{len(self.pending_restart)} config change(s) need a restart")
        if self.watchdog.get("withheld"):
            parts.append(f"watchdog withheld: {self.watchdog['withheld']}")
        return "; ".join(parts)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            self.refresh_status()

    def refresh_status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    # ---- reload -----------------------------------------------------------------------------

    def on_sighup(self) -> None:
        log.info("signal received", extra={"signal": "SIGHUP"})
        task = asyncio.get_running_loop().create_task(self._sighup_reload())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _sighup_reload(self) -> None:
        with contextlib.suppress(AdminError):
            await self.reload("SIGHUP")

    async def reload(self, source: str) -> dict[str, Any]:
        """Re-read and validate the config file; apply what can change live; say what needs a
        restart. Raises AdminError when the file is invalid (the running config stays)."""
        if self.shutting_down:
            raise AdminError("the daemon is shutting down", UNAVAILABLE)
        async with self._reload_lock:
            self.notifier.reloading()
            t0 = time.monotonic()
            try:
                new = await asyncio.to_thread(load_config, self.config_path,
                                              overrides=self.overrides)
            except ConfigError as exc:
                self.last_reload = {"ok": False, "source": source, "error": str(exc),
                                    "at": time.time()}
                log.error("reload failed; keeping the running config",
                          extra={"source": source, "error": str(exc)})
                self.notifier.ready(f"reload failed: {exc}; {self.status_line()}")
                raise AdminError(f"reload failed, running config kept: {exc}", FAILED) from None
            rp = reloading.plan(self.state.config, new)
            outcome = reloading.apply(self.state, rp)
            self.daemon.cfg = self.state.config
            self.pending_restart = outcome["restart_required"]
            result = {
                "config_file": self.config_path,
                "source": source,
                "changed": rp.changed,
                "applied": outcome["applied"],
                "restart_required": outcome["restart_required"],
                "ms": round((time.monotonic() - t0) * 1000, 2),
            }
            self.last_reload = {"ok": True, "at": time.time(), **result}
            log.info("configuration reloaded", extra={
                "source": source, "applied": result["applied"],
                "restart_required": sorted(result["restart_required"])})
            self.notifier.ready(self.status_line())
            self._last_status = ""
            return result

    # ---- drain ------------------------------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        if self.shutting_down:
            raise AdminError("the daemon is already shutting down", UNAVAILABLE)
        was = self.state.draining
        self.state.draining = True
        self.admin_drained = True
        if not was:
            log.warning("draining on operator request: new work is refused, in-flight finishes")
        self.refresh_status()
        return {"draining": True, "was_draining": was, **self.work_in_flight()}

    def undrain(self) -> dict[str, Any]:
        if self.shutting_down:
            raise AdminError("the daemon is shutting down; it cannot take work again",
                             UNAVAILABLE)
        was = self.state.draining
        self.state.draining = False
        self.admin_drained = False
        if was:
            log.info("undrained on operator request: taking new work")
        self.refresh_status()
        return {"draining": False, "was_draining": was}

    def work_in_flight(self) -> dict[str, int]:
        pools = self.state.pools.values()
        return {"queued_inputs": sum(p.queue_depth for p in pools),
                "inflight_batches": sum(1 for p in pools for s in p.slots if s.batch is not None)}

    # ---- watchdog ---------------------------------------------------------------------------

    async def _watchdog_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        max_lag = self._max_lag(interval)
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - t0 - interval)
            ok, reason = await self.check_health(lag, max_lag, wait=interval)
            if ok:
                self.notifier.watchdog()
                self.watchdog["last_ok"] = time.time()
                if self.watchdog["withheld"]:
                    log.info("watchdog resumed")
                self.watchdog["withheld"] = None
            else:
                if self.watchdog["withheld"] != reason:
                    log.error("watchdog withheld: the daemon looks wedged",
                              extra={"reason": reason})
                self.watchdog["withheld"] = reason
                self.refresh_status()

    def _max_lag(self, interval: float) -> float:
        wcfg = getattr(self.state.config, "watchdog", None)
        configured = getattr(wcfg, "max_loop_lag_s", None)
        return float(configured) if configured is not None else max(1.0, interval)

    async def check_health(self, lag: float, max_lag: float, wait: float
                           ) -> tuple[bool, str | None]:
        """(healthy, why not); `wait` bounds each probe."""
        if lag > max_lag:
            return False, f"event loop lag {lag:.3f} s > {max_lag:g} s"
        sup = self.state.supervisor
        if sup is not None:
            if sup.state == "escalated":
                return False, "root supervisor escalated"
            probe = getattr(sup, "probe", None)
            if probe is not None:
                try:
                    await asyncio.wait_for(asyncio.wrap_future(probe()), wait)
                except TimeoutError:
                    return False, f"supervisor threads did not answer within {wait:.1f} s"
        answered, asked = await asyncio.to_thread(ping_actors, wait)
        if asked and not answered:
            return False, f"none of {asked} actors answered a ping within {wait:.1f} s"
        return True, None


def ping_actors(timeout: float) -> tuple[int, int]:
    """Ping every live supervised actor (in a worker thread); (answered, asked)."""
    refs = [r for r in pykka.ActorRegistry.get_all()
            if issubclass(r.actor_class, SupervisedActor)]
    futures = []
    for ref in refs:
        with contextlib.suppress(pykka.ActorDeadError):
            futures.append(ref.ask(Ping(), block=False))
    deadline = time.monotonic() + timeout
    answered = 0
    for fut in futures:
        try:
            fut.get(timeout=max(0.0, deadline - time.monotonic()))
            answered += 1
        except pykka.Timeout:
            pass
        except Exception:  # died meanwhile: not a wedge
            answered += 1
    return answered, len(futures)
