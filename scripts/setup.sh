#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for kpy: system tools (apt) and a venv (.venv).
# Idempotent: installs only what is missing. Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nftables iptables conntrack ipset ipvsadm kmod iproute2 procps
  user-mode-linux gcc libc6-dev
  curl netcat-openbsd dnsutils socat haproxy
  shellcheck ruby
  python3 python3-venv python3-pip
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  echo "==> installing system packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: installing packages needs root (run with sudo)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import kpy, pytest, mypy, importlinter' 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.kpy-installed ]]; then
  echo "==> installing kpy and its development tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.kpy-installed
fi
