#!/usr/bin/env bash
# The whole test suite: set up, then quality gates (ruff, mypy --strict, import-linter)
# and pytest (warnings are errors). Run as root so the network-namespace and UML tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

export PYTHONDONTWRITEBYTECODE=1
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
.venv/bin/mypy
echo "==> import-linter"
.venv/bin/lint-imports
echo "==> pytest"
exec .venv/bin/pytest "$@"
