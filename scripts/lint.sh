#!/usr/bin/env bash
# Static checks, as CI runs them: ruff (pycodestyle, pyflakes, bugbear) and mypy, configured in
# pyproject.toml. Fails on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ruff ] && [ -x .venv/bin/mypy ] || bash scripts/setup.sh
.venv/bin/ruff check nbiafs tests scripts
.venv/bin/mypy
