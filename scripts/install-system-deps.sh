#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks use, when they
# are missing and we are root. Prometheus's package would start a service on
# :9090, so service starts are refused during the install.
set -euo pipefail
need=()
if [ "${1:-}" = "--venv" ]; then
    # Debian's Python needs python3-venv for `python3 -m venv`.
    ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    need=("python${ver}-venv")
else
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
    command -v wrk >/dev/null 2>&1 || need+=(wrk)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
    command -v rclone >/dev/null 2>&1 || need+=(rclone)
    command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
    command -v curl >/dev/null 2>&1 || need+=(curl)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
fi
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    if [ "${1:-}" = "--venv" ]; then
        echo "install-system-deps: python -m venv failed; install ${need[*]} (as root)" >&2
        exit 1
    fi
    echo "install-system-deps: not root; missing ${need[*]} (tests needing them will be skipped)" >&2
    exit 0
fi
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# A package may still have started its daemon; stop the ones we know of.
pkill -x prometheus 2>/dev/null || true
pkill -x nginx 2>/dev/null || true
