#!/usr/bin/env bash
# Install the Debian packages some tests need (promtool from `prometheus`, headless `chromium`)
# when their commands are missing. Runs as root in CI and on developer machines here; elsewhere
# it says what to install and exits non-zero.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "tests need: ${need[*]} (Debian packages); install them as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
