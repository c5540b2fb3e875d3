#!/usr/bin/env bash
# Tools the test suite runs besides Python: promtool (Debian's `prometheus` package) for the
# alert-rule tests. Installs only what is missing; needs root (or sudo) for apt-get.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
sudo_cmd=""
if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq
$sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts a Prometheus server as a service where an init system runs; tests
# need only promtool.
$sudo_cmd systemctl stop prometheus 2>/dev/null || true
command -v promtool
