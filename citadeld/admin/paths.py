"""Where the admin socket lives by default; citadeld and citadelctl must agree on it.

Order: ``$RUNTIME_DIRECTORY`` (systemd's RuntimeDirectory=, i.e. /run/citadel under the unit);
else /run/citadel when we are root or it exists (an operator's shell on a systemd node); else the
user's runtime directory ($XDG_RUNTIME_DIR/citadel, or /tmp/citadel-UID) for development.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_NAME = "admin.sock"
SYSTEM_RUNTIME_DIR = "/run/citadel"


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        return os.path.join(runtime.split(":")[0], SOCKET_NAME)
    if os.geteuid() == 0 or os.path.isdir(SYSTEM_RUNTIME_DIR):
        return os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    xdg = env.get("XDG_RUNTIME_DIR")
    base = os.path.join(xdg, "citadel") if xdg else f"/tmp/citadel-{os.geteuid()}"
    return os.path.join(base, SOCKET_NAME)
