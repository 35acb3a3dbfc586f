"""``citadeld keygen NAME --role R``: a new API key for ``auth.api_keys`` (no PostgreSQL).

Prints the key once and the config entry holding only its hash. With PostgreSQL use
``citadelctl keys create`` instead: those keys can be listed and revoked at run time.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from citadeld.security.config import ROLES
from citadeld.security.keys import generate


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="citadeld keygen", description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--rate", type=float, default=None, help="requests per minute")
    args = p.parse_args(argv)
    key_id, key, sha = generate()
    entry: dict[str, object] = {"id": key_id, "sha256": sha, "name": args.name,
                                "role": args.role}
    if args.rate is not None:
        entry["rate_per_min"] = args.rate
    print(f"API key (shown once, store it now): {key}", file=sys.stderr)
    print("# add under auth.api_keys:")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0
