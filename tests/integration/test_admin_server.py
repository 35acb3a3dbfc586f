"""The admin socket in-process: NDJSON protocol, versions, confirmation, timeouts, peer checks,
socket file handling, and commands registered from outside the admin package."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadeld.admin import REGISTRY, AdminError, Param, command
from citadeld.admin.client import ClientError, call
from citadeld.admin.lifecycle import Lifecycle
from citadeld.admin.server import AdminServer, AdminSocketError, PeerCred, peer_credentials
from citadeld.config import Config
from citadeld.runtime import Daemon
from citadeld.state import DaemonState

CFG = {
    "cache": {"backend": "memory"},
    "embedding": {"default_model": "m", "models": {"m": {
        "backend": "ollama", "dims": 8, "endpoints": [{"url": "http://127.0.0.1:9"}]}}},
}


@pytest.fixture
async def state() -> DaemonState:
    return Daemon(Config.model_validate(CFG)).build(asyncio.get_running_loop())


@pytest.fixture
async def server(tmp_path: Path, state: DaemonState) -> AsyncIterator[AdminServer]:
    srv = AdminServer(str(tmp_path / "admin.sock"), state, timeout_s=1.0)
    await srv.start()
    yield srv
    await srv.stop()


async def ask(srv: AdminServer, *lines: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(srv.path)
    out = []
    for line in lines:
        writer.write(line if isinstance(line, bytes) else orjson.dumps(line) + b"\n")
        await writer.drain()
        out.append(orjson.loads(await asyncio.wait_for(reader.readline(), 5)))
    writer.close()
    return out


async def test_socket_file_is_0660_and_removed_on_stop(tmp_path: Path, state: DaemonState
                                                       ) -> None:
    srv = AdminServer(str(tmp_path / "sub" / "admin.sock"), state)
    await srv.start()
    st = os.stat(srv.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    await srv.stop()
    assert not await asyncio.to_thread(os.path.exists, srv.path)


async def test_many_requests_on_one_connection(server: AdminServer) -> None:
    version, status, bad_version, garbage, not_obj = await ask(
        server, {"v": 1, "id": 1, "cmd": "version"},
        {"v": 1, "id": 2, "words": ["status"]},
        {"v": 99, "id": 3, "cmd": "version"},
        b"{nope\n", b"[1]\n")
    assert version["ok"] and version["id"] == 1 and version["result"]["protocol"] == 1
    assert status["ok"] and status["result"]["models"][0]["name"] == "m"
    assert not status["result"]["ready"]  # the endpoint is down: m cannot embed
    assert bad_version["error"]["code"] == "unsupported_version"
    assert bad_version["error"]["supported"] == [1]
    assert garbage["error"]["code"] == "bad_request"
    assert not_obj["error"]["code"] == "bad_request"


async def test_words_resolve_to_the_longest_command(server: AdminServer) -> None:
    show, group, unknown, usage, choice = await ask(
        server, {"words": ["config", "show"]}, {"words": ["log-level"]},
        {"words": ["frobnicate"]}, {"words": ["models", "warm"]},
        {"words": ["log-level", "set", "loud"], "confirm": True})
    assert show["ok"] and show["cmd"] == "config show"
    assert group["error"]["code"] == "usage" and group["error"]["candidates"] == [
        "log-level get", "log-level set"]
    assert unknown["error"]["code"] == "unknown_command"
    assert usage["error"]["code"] == "usage" and "MODEL" in usage["error"]["message"]
    assert choice["error"]["code"] == "usage" and "debug" in choice["error"]["message"]


async def test_mutating_commands_need_confirmation(server: AdminServer, state: DaemonState
                                                   ) -> None:
    state.cache.put_many([(b"k", __import__("numpy").ones(8, dtype="float32"))])
    refused, flushed = await ask(server, {"cmd": "cache flush"},
                                 {"cmd": "cache flush", "confirm": True})
    assert refused["error"]["code"] == "confirmation_required"
    assert "Delete every cached embedding" in refused["error"]["ask"]
    assert flushed["ok"] and flushed["result"] == {"flushed": 1, "backend": "memory"}


async def test_secrets_are_masked_in_config_show(tmp_path: Path) -> None:
    cfg = Config.model_validate({**CFG, "cache": {
        "backend": "redis", "redis_url": "redis://user:hunter2@127.0.0.1:1/0"},
        "embedding": {"default_model": "m", "models": {"m": {
            "backend": "openai", "dims": 8,
            "endpoints": [{"url": "http://127.0.0.1:9", "api_key": "sk-hunter2"}]}}}})
    st = Daemon(cfg).build(asyncio.get_running_loop())
    srv = AdminServer(str(tmp_path / "a.sock"), st)
    await srv.start()
    try:
        (show,) = await ask(srv, {"cmd": "config show"})
    finally:
        await srv.stop()
        await st.cache.close()
    text = orjson.dumps(show).decode()
    assert show["ok"] and "hunter2" not in text and "***" in text


async def test_handler_timeouts_and_failures_are_answers(server: AdminServer) -> None:
    @command("test sleepy", params=[Param("seconds")])
    async def sleepy(ctx: Any, args: dict[str, Any]) -> Any:
        await asyncio.sleep(float(args["seconds"]))
        return {"slept": float(args["seconds"])}

    @command("test broken")
    def broken(ctx: Any, args: dict[str, Any]) -> Any:
        raise KeyError("oops")

    @command("test refuse")
    def refuse(ctx: Any, args: dict[str, Any]) -> Any:
        raise AdminError("no breaker called x", "not_found", server="x")

    try:
        fast, slow, bad, refused = await ask(
            server, {"words": ["test", "sleepy", "0.01"]}, {"words": ["test", "sleepy", "5"]},
            {"cmd": "test broken"}, {"cmd": "test refuse"})
        assert fast["result"] == {"slept": 0.01}
        assert slow["error"]["code"] == "timeout"  # the server's 1 s budget
        assert bad["error"]["code"] == "internal" and "oops" in bad["error"]["message"]
        assert refused["error"] == {"code": "not_found", "message": "no breaker called x",
                                    "server": "x"}
        (helped,) = await ask(server, {"words": ["help", "test"]})
        assert {c["name"] for c in helped["result"]["commands"]} == {
            "test sleepy", "test broken", "test refuse"}
    finally:
        for name in ("test sleepy", "test broken", "test refuse"):
            REGISTRY.unregister(name)


async def test_blocking_client_and_unreachable_daemon(server: AdminServer, tmp_path: Path
                                                      ) -> None:
    answer = await asyncio.to_thread(call, server.path, cmd="health", timeout=5)
    assert answer["ok"] and answer["result"]["status"] == "down"
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(call, str(tmp_path / "gone.sock"), cmd="status")
    assert "gone.sock" in str(err.value) and err.value.kind == "unreachable"


async def test_a_live_socket_is_not_stolen_a_stale_one_is(tmp_path: Path, server: AdminServer,
                                                          state: DaemonState) -> None:
    with pytest.raises(AdminSocketError, match="in use"):
        await AdminServer(server.path, state).start()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    srv = AdminServer(str(stale), state)
    await srv.start()
    await srv.stop()
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdminSocketError, match="not a socket"):
        await AdminServer(str(tmp_path / "file"), state).start()


async def test_peer_credentials_come_from_the_kernel(server: AdminServer) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        cred = peer_credentials(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert os.getgid() in cred.groups or cred.groups == tuple(os.getgroups())
    gid = server.socket_gid
    assert gid is not None
    assert server.allowed(PeerCred(1, 0, 0, ()))
    assert server.allowed(PeerCred(1, 4242, gid, ()))
    assert server.allowed(PeerCred(1, 4242, 4242, (gid,)))  # supplementary group
    assert not server.allowed(PeerCred(1, 4242, 4242, (4243,)))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to run a client as another user) and /usr/bin/python3")
async def test_other_users_are_refused(state: DaemonState) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="citadel-admin-"))  # pytest's tmp is 0700
    os.chmod(tmp_path, 0o755)
    srv = AdminServer(str(tmp_path / "open.sock"), state, mode=0o666)  # only the peer check
    await srv.start()
    closed = AdminServer(str(tmp_path / "closed.sock"), state)  # 0660 root: the file refuses
    await closed.start()
    # stdlib only: the venv's interpreter lives under /root, which nobody cannot read
    code = ("import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try: s.connect(sys.argv[1])\n"
            "except PermissionError: print('permission denied'); sys.exit()\n"
            "s.sendall(b'{\"v\": 1, \"cmd\": \"status\"}\\n')\n"
            "print(json.loads(s.makefile().readline())['error']['code'])\n")
    try:
        def as_nobody(path: str) -> str:
            r = subprocess.run(
                ["/usr/bin/python3", "-c", code, path], capture_output=True, text=True,
                timeout=30, user=65534, group=65534, extra_groups=[], cwd="/",
            )
            return r.stdout.strip() or r.stderr
        assert await asyncio.to_thread(as_nobody, srv.path) == "forbidden"
        assert "permission denied" in await asyncio.to_thread(as_nobody, closed.path)
    finally:
        await srv.stop()
        await closed.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)


async def test_drain_undrain_and_reload_through_the_lifecycle(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(orjson.dumps(CFG).decode())  # JSON is YAML
    cfg = Config.model_validate(CFG)
    daemon = Daemon(cfg, str(conf))
    st = daemon.build(asyncio.get_running_loop())
    lc = Lifecycle(daemon, st)
    st.config = cfg.model_copy(update={"admin": cfg.admin.model_copy(
        update={"socket": str(tmp_path / "l.sock")})})
    assert await lc.start()
    try:
        drained, ready = await ask(lc.admin, {"cmd": "drain", "confirm": True},  # type: ignore
                                   {"cmd": "status"})
        assert drained["result"]["draining"] and st.draining
        assert ready["result"]["draining"] and not ready["result"]["ready"]
        (undrained,) = await ask(lc.admin, {"cmd": "undrain", "confirm": True})  # type: ignore
        assert not undrained["result"]["draining"] and not st.draining
        changed = {**CFG, "logging": {"level": "warning"}, "server": {"listen": "127.0.0.1:1"}}
        conf.write_text(orjson.dumps(changed).decode())
        (reloaded,) = await ask(lc.admin, {"cmd": "reload", "confirm": True})  # type: ignore
        res = reloaded["result"]
        assert res["applied"] == ["logging.level"]
        assert set(res["restart_required"]) >= {"server.listen"}
        assert st.config.logging.level == "warning" and st.config.server.listen != "127.0.0.1:1"
        conf.write_text("server: {listen: nope}\n")
        (failed,) = await ask(lc.admin, {"cmd": "reload", "confirm": True})  # type: ignore
        assert failed["error"]["code"] == "failed" and "server.listen" in failed["error"][
            "message"]
        assert st.config.logging.level == "warning"  # the running config stays
        lc.stopping()
        (late,) = await ask(lc.admin, {"cmd": "undrain", "confirm": True})  # type: ignore
        assert late["error"]["code"] == "unavailable"
    finally:
        await lc.stop()
        import logging

        from citadeld.logs import set_level
        set_level("info")
        logging.getLogger().setLevel(logging.WARNING)


async def test_watchdog_is_withheld_when_the_daemon_is_wedged(tmp_path: Path) -> None:
    import threading
    from types import SimpleNamespace

    from citadeld.supervision import SupervisedActor

    cfg = Config.model_validate(CFG)
    daemon = Daemon(cfg)
    st = daemon.build(asyncio.get_running_loop())
    lc = Lifecycle(daemon, st)
    assert await lc.check_health(lag=0.01, max_lag=1.0, wait=1.0) == (True, None)
    ok, why = await lc.check_health(lag=3.0, max_lag=1.0, wait=1.0)
    assert not ok and "event loop lag" in str(why)
    real = st.supervisor
    st.supervisor = SimpleNamespace(state="escalated")  # type: ignore[assignment]
    ok, why = await lc.check_health(lag=0.0, max_lag=1.0, wait=1.0)
    assert not ok and "escalated" in str(why)
    st.supervisor = real

    release = threading.Event()

    class Stuck(SupervisedActor):
        def on_receive_supervised(self, message: Any) -> Any:
            release.wait(10)  # a handler that never returns: pings queue up behind it

    ref = Stuck.start()
    try:
        ref.tell("block")
        ok, why = await lc.check_health(lag=0.0, max_lag=1.0, wait=0.3)
        assert not ok and "actors answered" in str(why)
    finally:
        release.set()
        ref.stop()
    assert await lc.check_health(lag=0.0, max_lag=1.0, wait=1.0) == (True, None)


async def test_status_lists_llm_breakers(tmp_path: Path) -> None:
    cfg = Config.model_validate({**CFG, "llm": {"servers": [
        {"name": "llm-a", "kind": "ollama", "url": "http://127.0.0.1:9", "models": ["m1"],
         "api_key": "sk-llm-secret"}]}})
    st = Daemon(cfg).build(asyncio.get_running_loop())
    srv = AdminServer(str(tmp_path / "b.sock"), st)
    await srv.start()
    try:
        status, show = await ask(srv, {"cmd": "status"}, {"cmd": "config show"})
    finally:
        await srv.stop()
    rows = [b for b in status["result"]["breakers"] if b["kind"] == "llm"]
    assert [(b["name"], b["state"]) for b in rows] == [("llm-a", "closed")]
    assert "sk-llm-secret" not in orjson.dumps(show).decode()
