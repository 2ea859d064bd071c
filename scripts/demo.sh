#!/usr/bin/env bash
# The README's first command: set up (if needed) and run the demo, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m eval demo "$@"
