#!/usr/bin/env bash
# Installs the servers that integration tests start on loopback (redis-server, prometheus with
# promtool) and the headless browser the console test drives (Debian's chromium, through
# Playwright; never `playwright install`) when they are missing and apt is usable. Tests that
# need them skip with a reason when they are still absent.
set -uo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo -n"
if command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} (for integration tests)"
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
    || echo "could not install ${missing[*]}; tests needing them will skip"
fi
exit 0
