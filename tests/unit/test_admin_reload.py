"""Reload planning: which changed keys apply live, which need a restart; running values kept."""

from __future__ import annotations

from typing import Any

import pytest

from citadeld.admin import reload as rl
from citadeld.admin.protocol import AdminError
from citadeld.admin.registry import Param, Registry
from citadeld.config import Config


def cfg(**sections: Any) -> Config:
    base: dict[str, Any] = {
        "embedding": {"default_model": "a", "models": {
            "a": {"backend": "ollama", "dims": 8, "endpoints": [{"url": "http://127.0.0.1:1"}]},
            "b": {"backend": "ollama", "dims": 8, "endpoints": [{"url": "http://127.0.0.1:2"}]},
        }},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return Config.model_validate(base)


def test_no_change_is_no_change() -> None:
    p = rl.plan(cfg(), cfg())
    assert not p.changed and p.live == {} and p.restart == {}


def test_live_and_restart_keys_are_told_apart() -> None:
    new = cfg(logging={"level": "debug"}, server={"listen": "127.0.0.1:9999",
                                                  "request_timeout_s": 5},
              cache={"ttl_s": 60})
    new = Config.model_validate({**new.model_dump(), "embedding": {
        **new.embedding.model_dump(), "max_inputs": 10, "models": {
            "a": {**new.embedding.models["a"].model_dump(), "batch": {"max_items": 3},
                  "dims": 16},
            "b": new.embedding.models["b"].model_dump()}}})
    p = rl.plan(cfg(), new)
    assert set(p.live) == {"logging.level", "server.request_timeout_s", "cache.ttl_s",
                           "embedding.max_inputs", "embedding.models.a.batch.max_items"}
    assert set(p.restart) == {"server.listen", "embedding.models.a.dims"}
    # the effective config takes the live values and keeps the running ones for the rest
    assert p.effective.server.listen == "127.0.0.1:8000"
    assert p.effective.server.request_timeout_s == 5
    assert p.effective.embedding.models["a"].batch.max_items == 3
    assert p.effective.embedding.models["a"].dims == 8


def test_added_and_removed_models_need_a_restart() -> None:
    old = cfg()
    d = old.model_dump()
    d["embedding"]["models"].pop("b")
    d["embedding"]["models"]["c"] = {"backend": "ollama", "dims": 4,
                                     "endpoints": [{"url": "http://127.0.0.1:3"}]}
    p = rl.plan(old, Config.model_validate(d))
    assert p.live == {}
    assert any(k.startswith("embedding.models.b.") and "removed" in v for k, v in p.restart.items())
    assert any(k.startswith("embedding.models.c.") and "added" in v for k, v in p.restart.items())


def test_live_values_that_depend_on_restart_only_ones_wait_for_the_restart() -> None:
    old = cfg()
    d = old.model_dump()
    d["embedding"]["models"]["c"] = {"backend": "ollama", "dims": 8,
                                     "endpoints": [{"url": "http://127.0.0.1:3"}]}
    d["embedding"]["default_model"] = "c"  # live on its own, but c does not run yet
    p = rl.plan(old, Config.model_validate(d))
    assert p.live == {}
    assert "embedding.default_model" in p.restart
    assert p.effective.embedding.default_model == "a"


def test_flatten_keeps_lists_as_leaves() -> None:
    assert rl.flatten({"a": {"b": [1, 2], "c": {}}, "d": 1}) == {"a.b": [1, 2], "a.c": {},
                                                                 "d": 1}


def test_other_modules_register_live_keys() -> None:
    seen: list[tuple[str, Any]] = []

    @rl.live("supervision.max_restarts")
    def apply(state: Any, path: str, value: Any) -> str | None:
        seen.append((path, value))
        return None

    try:
        p = rl.plan(cfg(), cfg(supervision={"max_restarts": 9}))
        assert p.live == {"supervision.max_restarts": 9}
    finally:
        rl._RULES.remove(("supervision.max_restarts", apply))


def test_registry_names_binding_and_errors() -> None:
    reg = Registry()

    @reg.command("widgets poke", mutating=True, params=[Param("widget"), Param(
        "how", choices=("gently", "hard"), optional=True)])
    def poke(ctx: Any, args: dict[str, Any]) -> Any:
        """Poke a widget."""
        return args

    cmd = reg.get("widgets poke")
    assert cmd is not None and cmd.help == "Poke a widget." and cmd.mutating
    assert cmd.synopsis() == "widgets poke WIDGET [gently|hard]"
    found, rest = reg.resolve(["widgets", "poke", "w1", "hard"])
    assert found is cmd and cmd.bind(rest) == {"widget": "w1", "how": "hard"}
    assert cmd.bind([], {"widget": "w2"}) == {"widget": "w2"}
    for words, code in ((["widgets"], "usage"), (["nothing"], "unknown_command")):
        with pytest.raises(AdminError) as err:
            reg.resolve(words)
        assert err.value.code == code
    for positional in ([], ["w", "softly"], ["w", "hard", "extra"]):
        with pytest.raises(AdminError) as err:
            cmd.bind(positional)
        assert err.value.code == "usage"
    with pytest.raises(ValueError):
        reg.register("widgets poke", poke)  # no silent replacement
    with pytest.raises(ValueError):
        reg.register("Bad Name", poke)
    reg.register("widgets poke", poke, replace=True)
