#!/usr/bin/env bash
# Tools the test suite runs besides Python, each installed only when missing (Debian packages;
# needs root or sudo for apt-get):
# - promtool (package `prometheus`) for the alert-rule tests;
# - chromium (package `chromium`, /usr/bin/chromium) for the console's browser tests, driven
#   by Playwright's Python client (Playwright's own browser download cannot work here).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
sudo_cmd=""
if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq
$sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The prometheus package starts a server as a service where an init system runs; tests need
# only promtool.
$sudo_cmd systemctl stop prometheus 2>/dev/null || true
command -v promtool
/usr/bin/chromium --version
