#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (apt packages, .venv), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
