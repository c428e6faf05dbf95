# Sourced by scripts/test: makes sure the PostgreSQL and Redis servers the
# storage tests need are reachable, and exports DATABASE_URL and REDIS_URL
# for them.
#
# - DATABASE_URL / REDIS_URL given: used as they are.
# - Otherwise the servers on localhost's default ports, if they answer.
# - Otherwise throwaway servers started here from the installed binaries, in
#   a temporary directory, stopped again when the test run ends.
# - Binaries not installed: says which Debian packages to install and fails.
#
# The tests create their own databases (random names, dropped afterwards)
# and their own Redis key prefixes, so a shared server is never disturbed.

services_dir=""
started_pg=""
started_redis=""

stop_services() {
  if [ -n "$started_pg" ]; then
    as_postgres "$started_pg/pg_ctl" -D "$services_dir/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "$started_redis" ]; then
    redis-cli -p "$started_redis" shutdown nosave >/dev/null 2>&1 || true
  fi
  if [ -n "$services_dir" ]; then
    rm -rf "$services_dir"
  fi
}

as_postgres() {
  # initdb and postgres refuse to run as root.
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    echo "PostgreSQL: using DATABASE_URL" >&2
    return
  fi
  if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    echo "PostgreSQL: the server on 127.0.0.1:5432" >&2
    return
  fi
  local bindir
  bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "PostgreSQL is neither running on 127.0.0.1:5432 nor installed." >&2
    echo "Install it with: apt-get install postgresql   (or set DATABASE_URL)" >&2
    exit 1
  fi
  services_dir="${services_dir:-$(mktemp -d)}"
  chmod 755 "$services_dir"
  mkdir -p "$services_dir/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$services_dir/pg"
  local port
  port="$(free_port)"
  as_postgres "$bindir/initdb" -D "$services_dir/pg" -A trust -U postgres >/dev/null
  as_postgres "$bindir/pg_ctl" -D "$services_dir/pg" -l "$services_dir/pg/log" -w \
    -o "-p $port -k $services_dir/pg -c listen_addresses=127.0.0.1 -c fsync=on" start >/dev/null
  started_pg="$bindir"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL: started a throwaway server on 127.0.0.1:$port" >&2
}

ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    echo "Redis: using REDIS_URL" >&2
    return
  fi
  if command -v redis-cli >/dev/null 2>&1 && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; then
    export REDIS_URL="redis://127.0.0.1:6379"
    echo "Redis: the server on 127.0.0.1:6379" >&2
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "Redis is neither running on 127.0.0.1:6379 nor installed." >&2
    echo "Install it with: apt-get install redis-server   (or set REDIS_URL)" >&2
    exit 1
  fi
  services_dir="${services_dir:-$(mktemp -d)}"
  local port
  port="$(free_port)"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$services_dir" --daemonize yes --pidfile "$services_dir/redis.pid" \
    --logfile "$services_dir/redis.log"
  for _ in $(seq 1 50); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  started_redis="$port"
  export REDIS_URL="redis://127.0.0.1:$port"
  echo "Redis: started a throwaway server on 127.0.0.1:$port" >&2
}

trap stop_services EXIT
ensure_postgres
ensure_redis
