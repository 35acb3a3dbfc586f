"""`citadelctl`: inspect and steer a running citadeld through its admin socket.

    citadelctl status                 readable tables (--json: the daemon's raw answer)
    citadelctl log-level set debug --yes
    citadelctl help                   the daemon describes its commands

The words after the options are sent as typed; the daemon resolves them against its command
registry, so commands added to the daemon work here without a new citadelctl. Commands that change
the daemon need ``--yes``; ``cache flush`` asks instead when run on a terminal.

Exit status: 0 success; 1 the daemon answered with an error (or `health` is not "ok");
2 usage error or a missing --yes; 69 the daemon cannot be reached; 75 no answer in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from citadeld import __version__
from citadeld.admin.client import ClientError, call
from citadeld.admin.paths import default_socket_path
from citadeld.admin.protocol import CONFIRMATION_REQUIRED, UNKNOWN_COMMAND, USAGE
from citadeld.security import audit_cli

EX_OK, EX_FAILED, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 1, 2, 69, 75
DEFAULT_CONFIG = "/etc/citadel/citadel.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="citadelctl",
        description="Inspect and steer a running citadeld through its admin socket.",
        epilog="`citadelctl help` lists the daemon's commands. Exit status: 0 ok, 1 failed, "
               "2 usage or missing --yes, 69 daemon unreachable, 75 timed out.",
    )
    p.add_argument("words", nargs="*", metavar="COMMAND", help="e.g. status, config show")
    p.add_argument("-s", "--socket", help="admin socket (default: $CITADELCTL_SOCKET, "
                   "admin.socket in the config, else /run/citadel/admin.sock)")
    p.add_argument("-c", "--config", help=f"read admin.socket from this file ({DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print the daemon's raw JSON answer")
    p.add_argument("-y", "--yes", action="store_true", help="confirm a command that changes "
                   "the daemon")
    p.add_argument("-t", "--timeout", type=float, default=130.0,
                   help="seconds to wait for the answer (default 130)")
    p.add_argument("--version", action="version", version=f"citadelctl {__version__}")
    audit_cli.add_options(p)
    return p


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    for var in ("CITADELCTL_SOCKET", "CITADEL_ADMIN__SOCKET"):
        if os.environ.get(var):
            return os.environ[var]
    path = args.config or DEFAULT_CONFIG
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        configured = (data.get("admin") or {}).get("socket")
        if configured:
            return str(configured)
    except Exception:  # an unreadable or broken config must not stop the operator's tool
        pass
    return default_socket_path()


# ---- rendering ----------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"), default=str)
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]],
          out: TextIO) -> None:
    cols = [(c, c.upper().replace("_", " ")) if isinstance(c, str) else c for c in columns]
    cells = [[_cell(r.get(key)) for key, _ in cols] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths, strict=True)).rstrip(),
          file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def kv(pairs: Sequence[tuple[str, Any]], out: TextIO) -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        print(f"{k + ':':<{width + 1}} {_cell(v)}", file=out)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def generic(result: Any, out: TextIO) -> None:
    if isinstance(result, dict):
        scalars = [(k, v) for k, v in result.items() if not isinstance(v, (list, dict))]
        if scalars:
            kv(scalars, out)
        for k, v in result.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                print(f"\n{k.upper()}", file=out)
                table(v, list(v[0].keys()), out)
            elif isinstance(v, (list, dict)):
                print(f"{k}: {json.dumps(v, default=str)}", file=out)
    elif isinstance(result, list) and result and all(isinstance(x, dict) for x in result):
        table(result, list(result[0].keys()), out)
    else:
        print(_cell(result), file=out)


def r_status(res: dict[str, Any], out: TextIO) -> None:
    lag = res.get("event_loop_lag_ms") or {}
    sup = res.get("supervisor") or {}
    wd = res.get("watchdog") or {}
    state = "shutting down" if res.get("shutting_down") else "draining" if res.get(
        "draining") else "ready" if res.get("ready") else "not ready"
    kv([
        ("citadeld", f"{res.get('version')} (pid {res.get('pid')})"),
        ("state", state),
        ("uptime", duration(res.get("uptime_s"))),
        ("listen", res.get("listen")),
        ("admin socket", res.get("admin_socket")),
        ("config", res.get("config_file")),
        ("supervisor", f"{sup.get('state')}, {sup.get('actors')} actors, "
                       f"{sup.get('restarts')} restarts"),
        ("loop lag", f"p50 {lag.get('p50', '-')} ms, p99 {lag.get('p99', '-')} ms, "
                     f"max {lag.get('max', '-')} ms" if lag else None),
        ("watchdog", ("withheld: " + wd["withheld"]) if wd.get("withheld") else
         f"every {wd.get('interval_s')} s" if wd.get("enabled") else "off"),
    ], out)
    if res.get("pending_restart"):
        print(f"needs restart: {', '.join(res['pending_restart'])}", file=out)
    print("\nMODELS", file=out)
    table(res.get("models") or [], ["name", "backend", "ready", "default", ("queue_depth", "QUEUE"),
                                    "queue_cap", ("inflight_batches", "IN-FLIGHT"),
                                    "slots_alive", "slots"], out)
    print("\nBACKENDS", file=out)
    if res.get("backends"):
        table(res["backends"], ["name", "status", "latency_ms", "error"], out)
    else:
        print("(none probed)", file=out)
    print("\nBREAKERS", file=out)
    if res.get("breakers"):
        table(res["breakers"], ["name", "kind", "state", "retry_in_s", "last_error"], out)
    else:
        print("(none)", file=out)


def r_health(res: dict[str, Any], out: TextIO) -> None:
    kv([("status", res.get("status")), ("ready", res.get("ready")),
        ("draining", res.get("draining")), ("cache", res.get("cache"))], out)
    models = res.get("models") or {}
    print("\nMODELS", file=out)
    table([{"name": k, "status": v} for k, v in models.items()], ["name", "status"], out)
    deps = res.get("dependencies") or {}
    if deps:
        print("\nDEPENDENCIES", file=out)
        table([{"name": k, **v} for k, v in sorted(deps.items())],
              ["name", "status", "latency_ms", "error"], out)


def r_actors(res: dict[str, Any], out: TextIO) -> None:
    sup = res.get("supervisor") or {}
    rows = res.get("actors") or []
    depth: dict[str, int] = {sup.get("name", "root"): 0}
    for row in rows:
        d = depth.get(row.get("parent") or "", 0) + 1
        depth[row["name"]] = d
        row["actor"] = "  " * (d - 1) + row["name"]
    print(f"supervisor {sup.get('name')}: {sup.get('state')}", file=out)
    table(rows, [("actor", "ACTOR"), "state", "mailbox", "in_flight", "restarts",
                 ("incarnation", "INC"), "up_s", "last_failure"], out)


def r_stats(res: dict[str, Any], out: TextIO) -> None:
    rows = [{"metric": m["metric"],
             "labels": ",".join(f"{k}={v}" for k, v in m["labels"].items()),
             "value": m["value"]} for m in res.get("metrics") or []]
    table(rows, ["metric", "labels", "value"], out)
    cache = res.get("cache") or {}
    if cache:
        print("\nCACHE", file=out)
        kv(sorted(cache.items()), out)


def r_config(res: dict[str, Any], out: TextIO) -> None:
    import yaml

    print(f"# {res.get('config_file') or '(no config file: defaults and environment)'}",
          file=out)
    if res.get("pending_restart"):
        print(f"# changed in the file, applied after a restart: "
              f"{', '.join(res['pending_restart'])}", file=out)
    print(yaml.safe_dump(res.get("config"), sort_keys=False).rstrip(), file=out)


def r_reload(res: dict[str, Any], out: TextIO) -> None:
    print(f"reloaded {res.get('config_file') or '(defaults)'}", file=out)
    if not res.get("changed"):
        print("no changes", file=out)
    applied = res.get("applied") or []
    print(f"applied live: {', '.join(applied) if applied else 'nothing'}", file=out)
    for key, why in sorted((res.get("restart_required") or {}).items()):
        print(f"needs restart: {key} ({why})", file=out)


def r_help(res: dict[str, Any], out: TextIO) -> None:
    cmds = res.get("commands") or []
    width = max((len(c["synopsis"]) for c in cmds), default=0)
    print("commands (* changes the daemon: add --yes):", file=out)
    for c in cmds:
        mark = "*" if c.get("mutating") else " "
        print(f"  {mark} {c['synopsis']:<{width}}  {c.get('help', '')}", file=out)


def r_models(res: dict[str, Any], out: TextIO) -> None:
    table(res.get("models") or [], ["name", "backend", "dims", "ready", "default",
                                    ("queue_depth", "QUEUE"), ("inflight_batches", "IN-FLIGHT"),
                                    "slots_alive", "slots", "endpoints", "aliases"], out)


def r_keys(res: dict[str, Any], out: TextIO) -> None:
    keys = res.get("keys") or []
    if keys:
        table(keys, ["id", "name", "role", "state", ("rate_per_min", "RATE/MIN"), "expires_at",
                     "created_at", "source"], out)
    else:
        print("(no API keys)", file=out)
    t = res.get("table") or {}
    if t.get("last_error"):
        print(f"\nPostgreSQL: {t['last_error']} (showing the last table loaded)", file=out)


def r_simple(fmt: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any], TextIO], None]:
    def render(res: dict[str, Any], out: TextIO) -> None:
        print(fmt(res), file=out)
    return render


RENDERERS: dict[str, Callable[[Any, TextIO], None]] = {
    "status": r_status,
    "health": r_health,
    "actors": r_actors,
    "stats": r_stats,
    "config show": r_config,
    "reload": r_reload,
    "help": r_help,
    "models list": r_models,
    "log-level get": r_simple(lambda r: f"{r['level']} (configured: {r['configured']})"),
    "log-level set": r_simple(lambda r: f"log level {r['was']} -> {r['level']}"),
    "drain": r_simple(lambda r: "draining: new work is refused, /health/ready is false; "
                      f"{r['queued_inputs']} inputs queued, {r['inflight_batches']} batches "
                      "in flight"),
    "undrain": r_simple(lambda r: "taking new work" + ("" if r["was_draining"] else
                                                         " (was not draining)")),
    "cache flush": r_simple(lambda r: f"flushed {r['flushed']} cached embeddings "
                            f"({r['backend']})"),
    "keys list": r_keys,
    "keys create": r_simple(lambda r: f"API key {r['id']} ({r['name']}, role {r['role']}"
                            f", expires {r['expires_at'] or 'never'}):\n\n    {r['key']}\n\n"
                            "Store it now: it is shown only once (only its hash is kept)."),
    "keys revoke": r_simple(lambda r: f"revoked {r['id']} ({r['name']}) at {r['revoked_at']}"),
    "models warm": r_simple(lambda r: f"{r['model']} is warm ({r['ms']} ms)"),
    "audit tail": lambda r, out: audit_cli.render(r, out, header=True),
}


# ---- main ---------------------------------------------------------------------------------------


def _fail(msg: str, code: int) -> int:
    print(f"citadelctl: {msg}", file=sys.stderr)
    return code


def _ask(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


_OWN_OPTIONS = frozenset({"--socket", "--config", "--json", "--yes", "--timeout", "--version",
                          *audit_cli.OWN_OPTIONS,
                          "--help"})


def split_named(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Take a command's own options (``--role admin``, ``--rate=100``) out of argv: they go to
    the daemon as named arguments, so a new daemon command needs no new citadelctl option."""
    rest: list[str] = []
    named: dict[str, str] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        name, eq, value = item.partition("=")
        if (item == "--" or not item.startswith("--") or len(item) < 3
                or name in _OWN_OPTIONS):
            rest.append(item)
            i += 1
            continue
        key = name[2:].replace("-", "_")
        if eq:
            named[key] = value
        elif i + 1 < len(items) and not items[i + 1].startswith("-"):
            named[key] = items[i + 1]
            i += 1
        else:
            named[key] = "true"
        i += 1
    return rest, named


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    raw, named = split_named(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(raw)
    words: list[str] = list(args.words) or ["help"]
    path = socket_path(args)
    out = sys.stdout
    if words == ["version"] and not args.json:
        print(f"citadelctl {__version__}")
    named.update(audit_cli.named_args(words, args))
    try:
        answer = call(path, words=words, args=named, confirm=args.yes, timeout=args.timeout)
        err = answer.get("error") or {}
        if (not answer["ok"] and err.get("code") == CONFIRMATION_REQUIRED and err.get("ask")
                and sys.stdin.isatty() and not args.json):
            if not _ask(err["ask"]):
                return _fail("not confirmed; nothing done", EX_USAGE)
            answer = call(path, words=words, args=named, confirm=True, timeout=args.timeout)
    except ClientError as exc:
        return _fail(str(exc), EX_TEMPFAIL if exc.kind == "timeout" else EX_UNAVAILABLE)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
    if not answer["ok"]:
        err = answer.get("error") or {}
        code = err.get("code")
        if not args.json:
            msg = err.get("message", "failed")
            if code == CONFIRMATION_REQUIRED:
                msg = f"{answer.get('cmd')} changes the running daemon: add --yes to confirm"
            print(f"citadelctl: {msg}", file=sys.stderr)
        return EX_USAGE if code in (CONFIRMATION_REQUIRED, USAGE, UNKNOWN_COMMAND) else EX_FAILED
    name, result = answer.get("cmd") or "", answer.get("result")
    try:
        _render(args, name, result, out)
    except BrokenPipeError:  # `citadelctl stats | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if name == "health" and isinstance(result, dict) and result.get("status") != "ok":
        return EX_FAILED
    if name == "audit tail" and args.follow:
        return audit_cli.follow(
            lambda more: call(path, words=words, args={**named, **more}, timeout=args.timeout),
            answer, out, args.json)
    return EX_OK


def _render(args: argparse.Namespace, name: str, result: Any, out: TextIO) -> None:
    if not args.json:
        if name == "version" and isinstance(result, dict):
            print(f"citadeld {result['version']} (protocol {result['protocol']}, python "
                  f"{result['python']}, pid {result['pid']})")
        else:
            try:
                RENDERERS.get(name, generic)(result, out)
            except (KeyError, TypeError, AttributeError):  # an answer of a newer daemon
                generic(result, out)
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
