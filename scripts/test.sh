#!/usr/bin/env bash
# Run the whole test suite (CPU only, offline). Sets up what it needs first; pytest arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
exec .venv/bin/python -m pytest -q "$@"
