"""Config reload: which changed keys apply live, which wait for a restart.

`plan()` diffs the running (effective) config against the freshly loaded one, leaf by leaf.
A leaf applies live when a registered rule matches its dotted path (``*`` is one segment) and
its applier accepts it; everything else (listen address, backends, endpoints, models added or
removed, sections nobody registered) is reported as "needs a restart" and keeps its running
value, so `config show` always shows what the daemon really uses.

Other modules add rules with :func:`live`::

    @live("llm.servers.*.timeout_s")
    def _apply(state, path, value) -> str | None:   # None: applied; a string: why not
        ...
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from citadeld.config import Config
from citadeld.logs import set_level

if TYPE_CHECKING:
    from citadeld.state import DaemonState

log = logging.getLogger("citadeld.reload")

# (state, dotted path, new value) -> None when applied, else the reason it needs a restart.
# Appliers run after the new effective config was validated and before it is installed.
Applier = Callable[["DaemonState", str, Any], "str | None"]

_RULES: list[tuple[str, Applier]] = []


def live(pattern: str) -> Callable[[Applier], Applier]:
    """Register an applier for config keys matching `pattern` (dotted, ``*`` = one segment)."""
    def deco(fn: Applier) -> Applier:
        _RULES.append((pattern, fn))
        return fn
    return deco


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted leaves; lists and scalars are leaves."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _match(pattern: str, path: str) -> bool:
    p, q = pattern.split("."), path.split(".")
    return len(p) == len(q) and all(fnmatch.fnmatchcase(b, a) for a, b in zip(p, q, strict=True))


def _rule_for(path: str) -> Applier | None:
    for pattern, fn in _RULES:
        if _match(pattern, path):
            return fn
    return None


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


@dataclass
class ReloadPlan:
    effective: Config  # the running config with the live changes applied
    live: dict[str, Any] = field(default_factory=dict)  # path -> new value
    restart: dict[str, str] = field(default_factory=dict)  # path -> reason

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)


def plan(running: Config, new: Config) -> ReloadPlan:
    old_d, new_d = running.model_dump(mode="json"), new.model_dump(mode="json")
    old_f, new_f = flatten(old_d), flatten(new_d)
    live_changes: dict[str, Any] = {}
    restart: dict[str, str] = {}
    for path in sorted(set(old_f) | set(new_f)):
        if path in old_f and path in new_f:
            if old_f[path] == new_f[path]:
                continue
            if _rule_for(path) is not None:
                live_changes[path] = new_f[path]
            else:
                restart[path] = "needs a restart"
        else:
            restart[path] = "added" if path not in old_f else "removed"
            restart[path] += "; needs a restart"
    effective_d = old_d
    for path, value in live_changes.items():
        _set_path(effective_d, path, value)
    try:
        effective = Config.model_validate(effective_d)
    except Exception as exc:  # live values that only make sense with the restart-only ones
        why = f"only valid together with changes that need a restart ({exc.__class__.__name__})"
        restart.update({p: why for p in live_changes})
        return ReloadPlan(running, {}, restart)
    return ReloadPlan(effective, live_changes, restart)


def apply(state: DaemonState, rp: ReloadPlan) -> dict[str, Any]:
    """Run the appliers; keys an applier declines move to the restart list (running value kept).
    Installs the effective config in `state`; returns {"applied": [...], "restart_required":
    {path: reason}}."""
    applied: list[str] = []
    declined: dict[str, str] = {}
    for path, value in rp.live.items():
        fn = _rule_for(path)
        assert fn is not None
        try:
            reason = fn(state, path, value)
        except Exception as exc:
            log.exception("reload: applying a key failed", extra={"key": path})
            reason = f"could not apply live ({type(exc).__name__}: {exc}); needs a restart"
        if reason is None:
            applied.append(path)
        else:
            declined[path] = reason
    effective = rp.effective
    if declined:  # keep the running value of what was not applied
        running_d = state.config.model_dump(mode="json")
        eff_d = effective.model_dump(mode="json")
        running_f = flatten(running_d)
        for path in declined:
            _set_path(eff_d, path, running_f[path])
        effective = Config.model_validate(eff_d)
    _install(state, effective)
    return {"applied": applied, "restart_required": {**rp.restart, **declined}}


def _install(state: DaemonState, cfg: Config) -> None:
    state.config = cfg
    state.embedding.cfg = cfg.embedding
    for name, pool in state.pools.items():
        if name in cfg.embedding.models:
            pool.cfg = cfg.embedding.models[name]


# ---- the built-in live keys ---------------------------------------------------------------------
# Read at use time from state.config / the pools' and the service's cfg (installed above):


@live("logging.level")
def _log_level(state: DaemonState, path: str, value: Any) -> str | None:
    set_level(str(value))
    return None


def _read_at_use(state: DaemonState, path: str, value: Any) -> str | None:
    return None


for _pattern in (
    "server.request_timeout_s",
    "embedding.max_inputs",
    "embedding.max_input_chars",
    "embedding.default_model",
    "embedding.models.*.batch.max_items",
    "embedding.models.*.batch.max_tokens",
    "embedding.models.*.batch.max_wait_ms",
    "embedding.models.*.queue_cap",
    "embedding.models.*.attempts",
    "embedding.models.*.truncate",
    "embedding.models.*.fallback_model",
):
    live(_pattern)(_read_at_use)


@live("cache.ttl_s")
def _cache_ttl(state: DaemonState, path: str, value: Any) -> str | None:
    cache: Any = state.cache
    if cache.backend != "memory":
        return "the Redis cache actor holds its TTL; needs a restart"
    cache.ttl_s = float(value)  # entries written from now on
    return None


@live("cache.max_entries")
def _cache_max_entries(state: DaemonState, path: str, value: Any) -> str | None:
    cache: Any = state.cache
    if cache.backend != "memory":
        return None  # unused by the Redis backend
    cache.max_entries = max(1, int(value))  # enforced on the next write
    return None
