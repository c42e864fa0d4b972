#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on the addresses the service uses (DATABASE_URL, REDIS_URL).
# Starts the local ones when they are installed but stopped; otherwise says what to do.
set -euo pipefail

DATABASE_URL="${DATABASE_URL:-postgres://root@127.0.0.1:5432/counters}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

pg_host=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or '127.0.0.1', p.port or 5432, p.username or '', p.path.lstrip('/'))" "$DATABASE_URL")
read -r PGHOST_ PGPORT_ PGUSER_ PGDB_ <<<"$pg_host"
redis_host=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or '127.0.0.1', p.port or 6379)" "$REDIS_URL")
read -r REDISHOST_ REDISPORT_ <<<"$redis_host"

wait_for() {  # wait_for <description> <command...>
  local what=$1; shift
  for _ in $(seq 1 30); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "error: $what did not come up" >&2; return 1
}

if ! pg_isready -q -h "$PGHOST_" -p "$PGPORT_" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting the local PostgreSQL…"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_for "PostgreSQL on $PGHOST_:$PGPORT_" pg_isready -h "$PGHOST_" -p "$PGPORT_"
  else
    echo "error: PostgreSQL is not reachable at $PGHOST_:$PGPORT_ and is not installed here." >&2
    echo "Install it (Debian: apt-get install postgresql) or set DATABASE_URL to a reachable server." >&2
    exit 1
  fi
fi

if ! redis-cli -h "$REDISHOST_" -p "$REDISPORT_" ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    echo "starting the local Redis…"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDISPORT_" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for "Redis on $REDISHOST_:$REDISPORT_" redis-cli -h "$REDISHOST_" -p "$REDISPORT_" ping
  else
    echo "error: Redis is not reachable at $REDISHOST_:$REDISPORT_ and is not installed here." >&2
    echo "Install it (Debian: apt-get install redis-server) or set REDIS_URL to a reachable server." >&2
    exit 1
  fi
fi

# The service's database (the test database is created by the tests themselves).
if [ -n "$PGDB_" ] && ! psql -h "$PGHOST_" -p "$PGPORT_" ${PGUSER_:+-U "$PGUSER_"} -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='$PGDB_'" | grep -q 1; then
  echo "creating database $PGDB_…"
  createdb -h "$PGHOST_" -p "$PGPORT_" ${PGUSER_:+-U "$PGUSER_"} "$PGDB_"
fi
echo "PostgreSQL ($PGHOST_:$PGPORT_/$PGDB_) and Redis ($REDISHOST_:$REDISPORT_) are up."
