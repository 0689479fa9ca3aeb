#!/usr/bin/env bash
# Makes sure RabbitMQ and PostgreSQL are installed and running on 127.0.0.1, as the test suite
# and the demo need them. Installs them with apt where absent; starts them where stopped; fails
# loudly (never skips) when a server cannot be reached. Also installs the tools scripts/demo and
# scripts/test call that a fresh Debian may lack: curl, python3 and python3-venv.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# curl: scripts/demo talks to the sandbox with it. python3: the demo's summaries. python3-venv:
# Debian ships python3 without ensurepip, so `python3 -m venv` (scripts/test, validate-deploy)
# fails until it is installed.
ensure_tools() {
  local missing=()
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "installing postgresql"
    apt_install postgresql
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting postgresql $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 60); do
    pg_isready -h 127.0.0.1 -p 5432 -q && break
    sleep 1
  done
  pg_isready -h 127.0.0.1 -p 5432 -q || { log "postgresql is not reachable on 127.0.0.1:5432"; exit 1; }
  # Tests connect as postgres without a password over TCP; a fresh Debian install wants one.
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    log "allowing trust authentication on 127.0.0.1 for local tests"
    local hba
    hba=$(su postgres -c "psql -Atc 'show hba_file'")
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    su postgres -c "psql -Atc 'select pg_reload_conf()'" >/dev/null
    sleep 1
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null \
    || { log "cannot log in to postgresql as postgres on 127.0.0.1"; exit 1; }
}

# True when something on 5672 answers the AMQP protocol header with a frame. A broker can be up
# enough to accept TCP and answer pings yet never answer AMQP (seen after abrupt restarts); every
# client would then hang, so that state is treated as down.
amqp_answers() {
  timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\x00\x00\x09\x01" >&3 &&
    [ "$(head -c 1 <&3 | od -An -tx1 | tr -d " ")" = 01 ]' 2>/dev/null
}

start_rabbitmq() {
  rabbitmq-server -detached || true
  for _ in $(seq 1 90); do
    rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
    sleep 1
  done
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { log "rabbitmq is not reachable"; exit 1; }
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "starting rabbitmq"
    start_rabbitmq
  fi
  # Wait for the AMQP listener itself, which comes up after the node answers pings.
  for _ in $(seq 1 30); do
    amqp_answers && return 0
    sleep 1
  done
  log "rabbitmq does not answer AMQP on 127.0.0.1:5672: restarting it"
  timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true
  # A node too wedged to stop when asked is killed by the pid in its pid file, which names
  # this node only (never another RabbitMQ node a test may run on other ports).
  for pidfile in /var/lib/rabbitmq/mnesia/*.pid; do
    [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 2
  start_rabbitmq
  for _ in $(seq 1 30); do
    amqp_answers && return 0
    sleep 1
  done
  log "rabbitmq answers pings but not AMQP on 127.0.0.1:5672"
  exit 1
}

ensure_tools
ensure_postgres
ensure_rabbitmq
log "postgresql and rabbitmq are up"
