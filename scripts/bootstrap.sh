#!/usr/bin/env bash
# Install what conveyor and its tests need on a bare Debian machine: the servers the
# tests start (PostgreSQL, Redis) when they are missing, then a virtualenv with the
# project and its dev tools. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# --venv-only: the demo needs no servers, so `make run` skips the apt-get step.
services=yes
[ "${1:-}" = "--venv-only" ] && services=no

need_apt=()
[ "$services" = no ] || command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The dashboard draws DAGs with Graphviz's dot; its browser tests drive Debian's chromium.
[ "$services" = no ] || command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
[ "$services" = no ] || command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "$services" = yes ] && ! command -v pg_ctl >/dev/null 2>&1 \
  && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${need_apt[*]}: install them (apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  echo "installing ${need_apt[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts the packaged services; the tests run their own on free ports.
  (service redis-server stop || true) >/dev/null 2>&1
fi

stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
