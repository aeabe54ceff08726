#!/usr/bin/env bash
# Create .venv with the project installed. `--dev` adds what the tests need: the dev extras,
# Azurite (Azure Blob emulator, from npm) and Debian's Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}

# 1) the virtual environment
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# 2) torch first, then pinned: a dependency asking for "torch" must not pull the multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${torch_version}"
installed=$(.venv/bin/python -c "import torch; print(torch.__version__)")
echo "torch==${installed}" > .venv/torch-constraint.txt

# 3) the project (and test tooling)
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[dev]"
else
  .venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e .
fi

if [ "$dev" = 1 ]; then
  # 4) Azurite for the Azure Blob tests
  [ -x .ci/node_modules/.bin/azurite ] || npm install --prefix .ci --no-audit --no-fund --silent azurite
  # 5) Chromium for the browser test (Playwright drives it; it never downloads a browser), and a
  #    Redis server for the tests of jobs shared by several replicas (started on 127.0.0.1 by them)
  missing=""
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
  if [ -n "$missing" ]; then
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
echo "environment ready: .venv ($(.venv/bin/python --version), torch ${installed})"
