#!/usr/bin/env bash
# Run the whole test suite (CPU only, offline). Sets up what it needs first; pytest arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
# Tests that need a local server (Azurite, Chromium) fail rather than skip when it is missing.
export CI=${CI:-1}
# A fresh, empty home for the run: nothing an earlier run (or the user) left there, such as Ray's
# token or caches, can make a test pass here that would fail on a new machine.
test_home=$(mktemp -d "${TMPDIR:-/tmp}/sd-endpoint-test-home.XXXXXX")
trap 'rm -rf "$test_home"' EXIT
HOME="$test_home" .venv/bin/python -m pytest -q "$@"
