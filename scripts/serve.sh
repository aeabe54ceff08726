#!/usr/bin/env bash
# Quick start: set up .venv and serve the embedded default model (random:tiny) on 127.0.0.1:5001.
# Any argument is passed to `sd-endpoint serve` (e.g. --model /models/sd-v1-4 --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sd-endpoint serve "$@"
