"""`citadelctl`: the operator's tool. The admin-socket commands arrive with their own issue."""

from __future__ import annotations

import argparse
import sys

from citadeld import __version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="citadelctl", description="Control a running citadeld")
    p.add_argument("--version", action="version", version=f"citadelctl {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("version", help="print the version")
    args = p.parse_args(argv)
    if args.command in (None, "version"):
        print(f"citadelctl {__version__}")
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
