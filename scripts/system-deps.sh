#!/usr/bin/env bash
# System packages the deployment tests need, installed with apt-get only when missing.
#   docker-compose  validates docker-compose.yml (`docker-compose config`; no engine needed)
#   redis-server    broker for the celery scale-out test
#   chromium        headless screenshots of the Dagster UI (with fonts-liberation for its text)
# Idempotent and quiet: a machine that already has them does nothing (no apt-get update).
# Run as root on Debian (CI does); otherwise it uses sudo when available.
set -euo pipefail

declare -A COMMAND_OF=(
  [docker-compose]=docker-compose
  [redis-server]=redis-server
  [chromium]=chromium
)

missing=()
for pkg in docker-compose redis-server chromium; do
  if ! command -v "${COMMAND_OF[$pkg]}" >/dev/null 2>&1; then
    missing+=("$pkg")
    if [ "$pkg" = chromium ]; then
      missing+=(fonts-liberation)
    fi
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: apt-get not found; install ${missing[*]} by hand" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "system-deps: need root (or sudo) to install ${missing[*]}" >&2
    exit 1
  fi
fi

echo "system-deps: installing ${missing[*]}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
apt=($SUDO env DEBIAN_FRONTEND=noninteractive apt-get)
if ! { "${apt[@]}" update -qq && \
       "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "system-deps: apt-get failed installing ${missing[*]}" >&2
  exit 1
fi
# Debian's redis-server package starts a system service where an init system runs; the tests
# start their own redis-server on a free port and do not use it.
exit 0
