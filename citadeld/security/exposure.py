"""The daemon refuses to serve a network without authentication unless told ``--insecure``."""

from __future__ import annotations

import ipaddress

from citadeld.config import Config


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def exposure_problem(cfg: Config, insecure: bool) -> str | None:
    """Why this config must not start (a message for stderr), or None."""
    if cfg.auth.enabled or insecure or is_loopback(cfg.server.host):
        return None
    return (f"refusing to listen on {cfg.server.listen} with authentication off (auth.enabled:"
            " false): anyone who can reach that address could use the daemon. Turn auth on,"
            " listen on a loopback address, or pass --insecure if the network is trusted.")
