"""citadelctl's side of ``audit tail``: options -> named args, rendering, and ``--follow``.

Light on purpose (no aiohttp, no daemon modules): citadelctl starts fast.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TextIO

COLUMNS = ("id", "at", "principal", "role", "method", "path", "status", "latency_ms", "client",
           "request_id")


#: citadelctl's own options for `audit tail`; --principal, --status and --path need none: they
#: travel to the daemon as named arguments like any command's (see ctl.split_named)
OWN_OPTIONS = ("--lines", "--follow")


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("audit tail (also --principal P, --status S, --path PREFIX)")
    g.add_argument("-n", "--lines", type=int, metavar="N", help="audit tail: rows (default 20)")
    g.add_argument("-f", "--follow", action="store_true",
                   help="audit tail: keep printing new rows until interrupted")


def named_args(words: list[str], args: argparse.Namespace) -> dict[str, str]:
    if words[:2] != ["audit", "tail"] or args.lines is None:
        return {}
    return {"n": str(args.lines)}


def render(res: dict[str, Any], out: TextIO, header: bool = False) -> None:
    if header:
        print("  ".join(c.upper() for c in COLUMNS), file=out)
    for row in res.get("items") or []:
        cells = []
        for c in COLUMNS:
            v = row.get(c)
            cells.append("-" if v is None else str(v))
        print("  ".join(cells), file=out)
    out.flush()


def follow(call: Callable[[dict[str, Any]], dict[str, Any]], first: dict[str, Any],
           out: TextIO, as_json: bool, interval_s: float = 1.0) -> int:
    """Print new rows as they land (rows reach PostgreSQL within the flush interval)."""
    last = (first.get("result") or {}).get("last_id", 0)
    try:
        while True:
            time.sleep(interval_s)
            answer = call({"after": str(last), "n": 1000})
            if not answer.get("ok"):
                err = answer.get("error") or {}
                print(f"citadelctl: {err.get('message', 'failed')}", flush=True)
                continue  # PostgreSQL away: keep trying, like tail -F
            res = answer.get("result") or {}
            if as_json:
                for row in res.get("items") or []:
                    print(json.dumps(row, default=str), file=out, flush=True)
            else:
                render(res, out)
            last = res.get("last_id", last)
    except KeyboardInterrupt:
        return 0
