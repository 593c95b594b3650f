#!/usr/bin/env bash
# The test command: installs tokenmill with its test tools, starts Redis and PostgreSQL if they
# are down, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
# The browser test drives Debian's Chromium and the compose test uses docker-compose's parser;
# install them where we can (as root with apt), otherwise those tests skip with the reason.
if { ! command -v chromium >/dev/null || ! command -v docker-compose >/dev/null; } \
   && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium docker-compose) \
    >/dev/null 2>&1 || echo "could not install chromium/docker-compose; their tests will skip" >&2
fi
bash scripts/services.sh
exec "${TOKENMILL_VENV:-.venv}/bin/python" -m pytest -q "$@"
