"""``citadelctl audit tail [-n N] [--follow] [--principal P] [--status S] [--path PREFIX]``.

The daemon answers the newest N matching rows, oldest first, and the id to continue from;
``--follow`` is citadelctl asking again with ``after`` = that id (see ``audit_cli``).
"""

from __future__ import annotations

from typing import Any

from citadeld.admin.protocol import UNAVAILABLE, USAGE, AdminError
from citadeld.admin.registry import AdminContext, Param, command
from citadeld.errors import BadRequest, Unavailable
from citadeld.security.audit_query import parse_filter, query

_PARAMS = [Param("n", optional=True, help="rows (default 20)"),
           Param("principal", optional=True, help="only this principal"),
           Param("status", optional=True, help="a status (429) or a class (4xx)"),
           Param("path", optional=True, help="path prefix"),
           Param("after", optional=True, help="only rows with a larger id (follow)")]


@command("audit tail", params=_PARAMS, help="the newest audit rows (requests), oldest first")
async def audit_tail(ctx: AdminContext, args: dict[str, Any]) -> Any:
    params = {k: str(v) for k, v in args.items() if v is not None and k != "n"}
    params["limit"] = str(args["n"]) if args.get("n") is not None else "20"
    storage = ctx.state.storage
    persistence = storage.persistence if storage is not None else None
    try:
        f = parse_filter(params, ctx.state.config.audit.query_max_rows)
        page = await query(persistence, f)
    except BadRequest as exc:
        raise AdminError(exc.message.replace("limit:", "n:"), USAGE) from None
    except Unavailable as exc:
        raise AdminError(exc.message, UNAVAILABLE) from None
    items = page["items"]
    if f.after_id is None:
        items.reverse()  # newest N, printed oldest first like tail(1)
    last = items[-1]["id"] if items else (f.after_id or 0)
    return {"items": items, "last_id": last}
