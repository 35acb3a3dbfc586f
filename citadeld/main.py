"""`citadeld` command line: validate config (exit 78 before binding anything), then run."""

from __future__ import annotations

import argparse
import asyncio
import sys

from citadeld import __version__
from citadeld.config import EX_CONFIG, ConfigError, load_config, parse_listen


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="citadeld", description="Citadel orchestration daemon")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    p.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback listen address with authentication off")
    p.add_argument("--version", action="version", version=f"citadeld {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:  # `citadeld migrate [--dry-run]`: schema migrations by hand
        from citadeld.migrate import main as migrate_main
        return migrate_main(argv[1:])
    if argv[:1] == ["keygen"]:  # `citadeld keygen NAME --role R`: a key for auth.api_keys
        from citadeld.security.keygen import main as keygen_main
        return keygen_main(argv[1:])
    args = _parser().parse_args(argv)
    overrides = {}
    if args.listen:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            print(f"citadeld: --listen: {exc}", file=sys.stderr)
            return EX_CONFIG
        overrides["server.listen"] = args.listen
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"citadeld: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    from citadeld.security.exposure import exposure_problem

    problem = exposure_problem(cfg, args.insecure)
    if problem is not None:
        print(f"citadeld: {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print("configuration ok")
        return 0
    from citadeld.logs import setup_logging
    from citadeld.runtime import Daemon

    setup_logging(cfg.logging.level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; stay runnable anyway
        return asyncio.run(Daemon(cfg, args.config, overrides).run())
    return uvloop.run(Daemon(cfg, args.config, overrides).run())


if __name__ == "__main__":
    sys.exit(main())
