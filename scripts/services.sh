#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) answer, starting the local
# servers when they are installed but down. Used by the test command.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 6379; then
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  else
    echo "Redis is not reachable on 127.0.0.1:6379 and redis-server is not installed" >&2
  fi
fi
if ! up 5432; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  else
    echo "PostgreSQL is not reachable on 127.0.0.1:5432 and no cluster is installed" >&2
  fi
fi
for _ in $(seq 1 30); do
  up 6379 && up 5432 && exit 0
  sleep 1
done
echo "services not ready: redis $(up 6379 && echo up || echo down), postgres $(up 5432 && echo up || echo down)" >&2
exit 1
