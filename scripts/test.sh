#!/usr/bin/env bash
# Run the whole test suite (CPU only, offline). Sets up what it needs first; pytest arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
# Tests that need a local server (Azurite, Chromium) fail rather than skip when it is missing.
export CI=${CI:-1}
exec .venv/bin/python -m pytest -q "$@"
