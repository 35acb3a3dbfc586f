"""`citadeld migrate`: apply the PostgreSQL schema migrations by hand (the daemon also applies
them at start-up, under the same advisory lock), or print their SQL with ``--dry-run``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from citadeld.config import EX_CONFIG, ConfigError, load_config
from citadeld.storage import migrations

EX_UNAVAILABLE = 69


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="citadeld migrate",
                                description="Apply citadeld's PostgreSQL schema migrations")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    p.add_argument("--dsn", help="PostgreSQL DSN (default: persistence.dsn of the config)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the SQL that would run, change nothing")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return p


async def _connect(dsn: str, wait_s: float) -> Any:
    import aiopg

    return await aiopg.connect(dsn, timeout=wait_s, enable_hstore=False, enable_uuid=False,
                               connect_timeout=max(1, int(wait_s)))


async def _run(dsn: str, dry_run: bool, wait_s: float) -> int:
    try:
        conn = await _connect(dsn, wait_s)
    except Exception as exc:
        if dry_run:
            print(f"-- could not connect ({exc}); showing every migration", file=sys.stderr)
            sys.stdout.write(migrations.render(list(migrations.MIGRATIONS)))
            return 0
        print(f"citadeld migrate: cannot connect to PostgreSQL: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if dry_run:
            todo = await migrations.plan(conn)
            if not todo:
                print("-- schema is up to date (version "
                      f"{migrations.latest_version()}); nothing to run")
            else:
                sys.stdout.write(migrations.render(todo))
            return 0
        applied = await migrations.migrate(conn)
    finally:
        conn.close()
    if applied:
        for m in applied:
            print(f"applied migration {m.version}: {m.name}")
    else:
        print(f"schema is up to date (version {migrations.latest_version()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dsn = args.dsn
    if dsn is None:
        try:
            dsn = load_config(args.config).persistence.dsn
        except ConfigError as exc:
            print(f"citadeld: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
    if not dsn:
        if args.dry_run:
            sys.stdout.write(migrations.render(list(migrations.MIGRATIONS)))
            return 0
        print("citadeld migrate: persistence.dsn is not set (persistence is disabled)",
              file=sys.stderr)
        return EX_CONFIG
    return asyncio.run(_run(dsn, args.dry_run, args.timeout))
