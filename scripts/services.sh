#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ are installed and running on this machine, on their
# default local ports. Installs the Debian packages only when a server is absent, starts only
# what is stopped, and says nothing when everything is already up.
set -euo pipefail

quiet() { "$@" >/dev/null 2>&1; }
say() { echo "services: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
  say "$name did not come up within ${secs}s"; return 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v pg_ctlcluster >/dev/null || missing+=(postgresql postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server redis-tools)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
# The TLS suite (tests/tls_only.rs) makes its certificates and trusts its CA with these.
command -v openssl >/dev/null || missing+=(openssl)
command -v update-ca-certificates >/dev/null || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >/dev/null
  # Package scripts may try to start the servers through systemd, which containers lack;
  # the servers are started explicitly below either way.
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || true
  for cmd in pg_ctlcluster redis-server rabbitmq-server; do
    command -v $cmd >/dev/null || { say "could not install the package providing $cmd"; exit 1; }
  done
fi

# PostgreSQL
if ! quiet pg_isready -q -h 127.0.0.1 -p 5432; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$version" main >/dev/null
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL 30 quiet pg_isready -q -h 127.0.0.1 -p 5432
fi
# The services connect as postgres over TCP without a password (a local development setup):
# if that is refused, trust loopback connections.
if ! quiet psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1'; then
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$hba" ] && ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
    say "allowing passwordless loopback connections for user postgres in $hba"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
  fi
  wait_for "PostgreSQL login" 10 quiet psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1'
fi

# Redis (kept in memory only: the project treats Redis as a cache, Postgres as the truth)
if ! quiet redis-cli -h 127.0.0.1 -p 6379 ping; then
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null
  wait_for Redis 15 quiet redis-cli -h 127.0.0.1 -p 6379 ping
fi

# RabbitMQ
if ! port_open 5672; then
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for RabbitMQ 90 port_open 5672
fi
