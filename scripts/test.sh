#!/usr/bin/env bash
# The test command: installs tokenmill with its test tools, starts Redis and PostgreSQL if they
# are down, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
bash scripts/services.sh
exec "${TOKENMILL_VENV:-.venv}/bin/python" -m pytest -q "$@"
