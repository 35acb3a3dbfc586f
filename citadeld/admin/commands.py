"""The built-in admin commands. Others register theirs the same way (see registry.py)."""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import TYPE_CHECKING, Any

from citadeld import __version__
from citadeld.admin.protocol import PROTOCOL_VERSION, UNAVAILABLE, AdminError
from citadeld.admin.registry import AdminContext, Param, command
from citadeld.config import redact
from citadeld.errors import CitadelError

if TYPE_CHECKING:
    from citadeld.admin.lifecycle import Lifecycle

LEVELS = ("debug", "info", "warning", "error")


def _lifecycle(ctx: AdminContext) -> Lifecycle:
    if ctx.lifecycle is None:
        raise AdminError("not available in this daemon", UNAVAILABLE)
    return ctx.lifecycle


# ---- breakers: a section any module can contribute to -------------------------------------------

BreakerSource = Any  # Callable[[DaemonState], list[dict]]: rows with name, state, ...
_BREAKER_SOURCES: list[BreakerSource] = []


def breaker_source(fn: BreakerSource) -> BreakerSource:
    """Register a function returning breaker rows ({name, kind, state, ...}) for `status`."""
    _BREAKER_SOURCES.append(fn)
    return fn


@breaker_source
def _cache_breaker(state: Any) -> list[dict[str, Any]]:
    circuit = getattr(state.cache, "circuit", None)
    if circuit is None:
        return []
    wait = max(0.0, circuit.open_until - circuit.clock())
    return [{"name": "cache:redis", "kind": "cache",
             "state": "open" if wait > 0 else "closed" if circuit.last_error is None
             else "half-open",
             "retry_in_s": round(wait, 3), "last_error": circuit.last_error}]


@breaker_source
def _llm_breakers(state: Any) -> list[dict[str, Any]]:
    """One row per LLM server (the router's breakers), when LLM servers are configured."""
    llm = getattr(state, "llm", None)
    registry = getattr(llm, "registry", None)
    if registry is None:
        return []
    rows = []
    for name, server in sorted(registry.snapshot().items()):
        b = server.get("breaker") or {}
        rows.append({"name": name, "kind": "llm", "state": b.get("state"),
                     "retry_in_s": None, "last_error": b.get("last_failure"),
                     "trips": b.get("trips"), "inflight": server.get("inflight")})
    return rows


def breakers(state: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for source in _BREAKER_SOURCES:
        try:
            rows.extend(source(state))
        except Exception as exc:  # a broken source must not break `status`
            rows.append({"name": getattr(source, "__name__", "?"), "state": "unknown",
                         "last_error": repr(exc)})
    return rows


# ---- read-only ----------------------------------------------------------------------------------


@command("help", help="list the daemon's commands", params=[Param("command", optional=True)])
def help_(ctx: AdminContext, args: dict[str, Any]) -> Any:
    cmds = ctx.registry.all()
    want = args.get("command")
    if want:
        cmds = [c for c in cmds if c.name == want or c.name.startswith(want + " ")]
        if not cmds:
            raise AdminError(f"no command {want!r}", "unknown_command")
    return {"protocol": PROTOCOL_VERSION, "commands": [c.describe() for c in cmds]}


@command("version", help="daemon and protocol versions")
def version(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return {"version": __version__, "protocol": PROTOCOL_VERSION,
            "python": platform.python_version(), "pid": os.getpid()}


def _models(ctx: AdminContext) -> list[dict[str, Any]]:
    state = ctx.state
    rows = []
    for name, mcfg in state.config.embedding.models.items():
        pool = state.pools.get(name)
        snap: dict[str, Any] = pool.snapshot() if pool is not None else {}
        slots: list[dict[str, Any]] = snap.get("slots", [])
        rows.append({
            "name": name,
            "backend": mcfg.backend,
            "dims": mcfg.dims,
            "ready": bool(pool and pool.can_embed()),
            "default": name == state.config.embedding.default_model,
            "queue_depth": snap.get("queue_depth", 0),
            "queue_cap": mcfg.queue_cap,
            "inflight_batches": sum(1 for s in slots if s["busy"]),
            "slots_alive": sum(1 for s in slots if s["alive"]),
            "slots": len(slots),
            "endpoints": [ep.name or ep.url for ep in mcfg.endpoints],
            "aliases": list(mcfg.aliases),
        })
    return rows


def _backends(ctx: AdminContext) -> list[dict[str, Any]]:
    rows = []
    for name, dep in sorted(ctx.state.health.all().items()):
        rows.append({"name": name, "status": dep.get("status"),
                     "latency_ms": dep.get("latency_ms"), "error": dep.get("error")})
    return rows


def _walk(rows: list[dict[str, Any]], parent: str | None = None) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        flat = {k: v for k, v in row.items() if k != "children"}
        flat["parent"] = parent
        out.append(flat)
        out.extend(_walk(row.get("children") or [], row["name"]))
    return out


@command("status", help="uptime, version, listen address, models, backends, breakers, queues")
def status(ctx: AdminContext, args: dict[str, Any]) -> Any:
    state = ctx.state
    lc = ctx.lifecycle
    sup = state.supervisor
    actors = _walk(sup.snapshot()) if sup is not None else []
    lag = state.extra.get("loop_lag")
    out: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - state.started_at, 3),
        "started_at": state.started_at,
        "listen": state.config.server.listen,
        "admin_socket": lc.admin.path if lc is not None and lc.admin is not None else None,
        "draining": state.draining,
        "shutting_down": bool(lc and lc.shutting_down),
        "ready": not state.draining and all(p.can_embed() for p in state.pools.values()),
        "models": _models(ctx),
        "backends": _backends(ctx),
        "breakers": breakers(state),
        "queues": {name: pool.queue_depth for name, pool in state.pools.items()},
        "supervisor": {"state": sup.state if sup is not None else None,
                       "actors": len(actors),
                       "restarts": sum(int(a.get("restarts") or 0) for a in actors)},
        "event_loop_lag_ms": lag.snapshot() if lag is not None else None,
    }
    if lc is not None:
        out["config_file"] = lc.config_path
        out["pending_restart"] = sorted(lc.pending_restart)
        out["watchdog"] = dict(lc.watchdog)
        out["systemd_status"] = lc.status_line()
    return out


@command("health", help="the /health summary and every dependency")
def health(ctx: AdminContext, args: dict[str, Any]) -> Any:
    from citadeld.http.health_routes import summary

    out = summary(ctx.state)
    out["dependencies"] = ctx.state.health.all()
    return out


@command("actors", help="the supervision tree: state, mailbox, in-flight, restarts")
def actors(ctx: AdminContext, args: dict[str, Any]) -> Any:
    sup = ctx.state.supervisor
    if sup is None:
        return {"supervisor": None, "actors": []}
    rows = _walk(sup.snapshot(), sup.name)
    busy: dict[str, int] = {}
    for model, pool in ctx.state.pools.items():
        for slot in pool.slots:
            busy[f"embedder:{model}:{slot.index}"] = 1 if slot.batch is not None else 0
    now = time.time()
    for row in rows:
        row.setdefault("mailbox", None)
        row["in_flight"] = busy.get(row["name"])
        started = row.get("started_at")
        row["up_s"] = round(now - started, 1) if started and row["state"] == "running" else None
    return {"supervisor": {"name": sup.name, "state": sup.state}, "actors": rows}


@command("stats", help="counters and gauges from the metrics registry, pools and cache")
def stats(ctx: AdminContext, args: dict[str, Any]) -> Any:
    state = ctx.state
    samples: list[dict[str, Any]] = []
    for family in state.metrics.registry.collect():
        for s in family.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            samples.append({"metric": s.name, "labels": dict(s.labels), "value": s.value})
    return {
        "metrics": samples,
        "cache": state.cache.stats(),
        "pools": {name: pool.snapshot() for name, pool in state.pools.items()},
    }


@command("config show", help="the running configuration, secrets masked")
def config_show(ctx: AdminContext, args: dict[str, Any]) -> Any:
    lc = ctx.lifecycle
    return {"config_file": lc.config_path if lc else None,
            "pending_restart": sorted(lc.pending_restart) if lc else [],
            "config": mask_secrets(redact(ctx.state.config))}


_SECRET_KEYS = ("api_key", "apikey", "password", "passwd", "secret", "token", "dsn")


def mask_secrets(data: Any, key: str = "") -> Any:
    """Belt and braces over `redact()`: sections added later may hold secrets it does not know
    (LLM keys, database DSNs). Masks secret-looking keys and the password in any URL."""
    if isinstance(data, dict):
        return {k: mask_secrets(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v, key) for v in data]
    if isinstance(data, str) and data:
        if any(s in key.lower() for s in _SECRET_KEYS) and data != "***":
            return "***"
        scheme, sep, rest = data.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return data


@command("log-level get", help="the current log level")
def log_level_get(ctx: AdminContext, args: dict[str, Any]) -> Any:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return {"level": level, "configured": ctx.state.config.logging.level}


@command("cache stats", help="cache backend, hit/miss counters, health")
async def cache_stats(ctx: AdminContext, args: dict[str, Any]) -> Any:
    out = dict(ctx.state.cache.stats())
    out["health"] = ctx.state.health.get("cache")
    return out


@command("models list", help="configured models: backend, readiness, queue, slots")
def models_list(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return {"models": _models(ctx)}


@command("models warm", help="load a model at its backend now (one tiny uncached embedding)",
         params=[Param("model", help="model name or alias")], timeout=120.0)
async def models_warm(ctx: AdminContext, args: dict[str, Any]) -> Any:
    service = ctx.state.embedding
    try:
        name = service.resolve(args["model"])
    except CitadelError as exc:
        raise AdminError(exc.message, "not_found") from None
    t0 = time.perf_counter()
    try:
        out = await service.embed(name, ["warm up"], use_cache=False)
    except CitadelError as exc:
        raise AdminError(f"warming {name} failed: {exc.message}") from None
    return {"model": out.model, "warm": True, "ms": round((time.perf_counter() - t0) * 1000, 1)}


# ---- mutating -----------------------------------------------------------------------------------


@command("reload", mutating=True, timeout=60.0,
         help="re-read the config file (as SIGHUP): apply what can change live, list the rest")
async def reload(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return await _lifecycle(ctx).reload("citadelctl")


@command("log-level set", mutating=True, help="change the log level now (until restart/reload)",
         params=[Param("level", choices=LEVELS)])
def log_level_set(ctx: AdminContext, args: dict[str, Any]) -> Any:
    from citadeld.logs import set_level

    before = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    set_level(args["level"])
    logging.getLogger("citadeld.admin").warning(
        "log level changed", extra={"from": before, "to": args["level"]})
    return {"level": args["level"], "was": before}


@command("drain", mutating=True,
         help="stop taking new work, let in-flight work finish; /health/ready turns false")
def drain(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return _lifecycle(ctx).drain()


@command("undrain", mutating=True, help="take new work again after drain")
def undrain(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return _lifecycle(ctx).undrain()


@command("cache flush", mutating=True, timeout=130.0,
         ask="Delete every cached embedding? Clients will recompute them.",
         help="delete every cached embedding (our key prefix only)")
async def cache_flush(ctx: AdminContext, args: dict[str, Any]) -> Any:
    try:
        n = await ctx.state.cache.flush()
    except Exception as exc:
        raise AdminError(f"cache flush failed: {type(exc).__name__}: {exc}") from None
    return {"flushed": n, "backend": ctx.state.cache.backend}
