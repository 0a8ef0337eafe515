#!/usr/bin/env bash
# Set up (scripts/setup.sh), then start the local archive with its demo content
# and mount it (default mountpoint: ./nbia). Ctrl-C unmounts and stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nbiafs demo "$@"
