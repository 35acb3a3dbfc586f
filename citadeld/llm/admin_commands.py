"""`citadelctl breakers list|open|close|reset SERVER`: the operator's hand on the LLM breakers."""

from __future__ import annotations

from typing import Any

from citadeld.admin.protocol import AdminError
from citadeld.admin.registry import AdminContext, Param, command
from citadeld.llm.router import LLMRouter

_SERVER = [Param("server", help="LLM server name, as in llm.servers")]


def _router(ctx: AdminContext) -> LLMRouter:
    if ctx.state.llm is None:
        raise AdminError("no LLM servers are configured (llm.servers)", "not_found")
    return ctx.state.llm


@command("breakers list", help="circuit breaker of every LLM server")
async def breakers_list(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return _router(ctx).snapshot()["servers"]


async def _act(ctx: AdminContext, args: dict[str, Any], action: str) -> Any:
    try:
        return _router(ctx).command(args["server"], action)
    except KeyError as exc:
        raise AdminError(str(exc.args[0]), "not_found") from None


@command("breakers open", mutating=True, params=_SERVER,
         help="force a server's breaker open: no traffic until close or reset")
async def breakers_open(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return await _act(ctx, args, "force_open")


@command("breakers close", mutating=True, params=_SERVER,
         help="force a server's breaker closed: traffic regardless of failures")
async def breakers_close(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return await _act(ctx, args, "force_closed")


@command("breakers reset", mutating=True, params=_SERVER,
         help="drop any override and the failure history: back to CLOSED")
async def breakers_reset(ctx: AdminContext, args: dict[str, Any]) -> Any:
    return await _act(ctx, args, "reset")
