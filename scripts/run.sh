#!/usr/bin/env bash
# Install (once) and start citadeld on its embedded defaults: in-process all-MiniLM model,
# in-process cache, 127.0.0.1:8000. Extra arguments go to citadeld (e.g. --listen, --config).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh local
exec .venv/bin/citadeld "$@"
