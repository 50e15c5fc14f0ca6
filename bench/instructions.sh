#!/usr/bin/env bash
# Instructions per proxied request for weft, Envoy and HAProxy, counted by callgrind: the one
# number here that the machine's load cannot move (valgrind counts, it does not time), so the
# ratios hold on a noisy 2-core box. User-space instructions only: each proxy's syscalls
# (similar per request) are not in it, so it bounds the throughput ratio rather than equals it.
#
# Startup is taken out by difference: two runs per proxy under the same wrk load (-c8), 5 s and
# 20 s; (instructions_20 - instructions_5) / (requests_20 - requests_5).
# Loopback only. Needs what bench/run.sh installs, plus valgrind. Usage: bench/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
[ -x target/release/weft-proxy ] || cargo build --release -p weft-proxy
# weft is the build with profile-guided optimisation when bench/pgo.sh has made one; the plain
# release build is counted beside it as weft-plain.
WEFT_PLAIN=$PWD/target/release/weft-proxy
WEFT=$PWD/target/pgo/release/weft-proxy
names="weft weft-plain envoy haproxy"
[ -x "$WEFT" ] || { WEFT=$WEFT_PLAIN; names="weft envoy haproxy"; }
if [ "$WEFT" != "$WEFT_PLAIN" ] && [ "$WEFT" -ot "$WEFT_PLAIN" ]; then
  echo "note: target/pgo is older than target/release; bench/pgo.sh rebuilds it from this code" >&2
fi
ENVOY=$(python3 -c "import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),'_bin','envoy'))")
W=$(mktemp -d /tmp/weft-instr.XXXXXX)
trap 'rm -rf "$W"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
UP=$(free_port); P_WEFT=$(free_port); A_WEFT=$(free_port); P_ENVOY=$(free_port); A_ENVOY=$(free_port); P_HA=$(free_port)
# The same peers, configured the same way, as bench/run.py.
python3 bench/peers.py "$W" "$UP" "$P_WEFT" "$P_ENVOY" "$A_ENVOY" "$P_HA"

run() { # name seconds -> "requests instructions"
  local name=$1 dur=$2 port ready
  local out="$W/cg.$name.$dur"
  case $name in
    weft|weft-plain)
          local bin=$WEFT; [ "$name" = weft ] || bin=$WEFT_PLAIN
          valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --config "$W/mesh.yaml" \
            --outbound-addr 127.0.0.1:$P_WEFT --admin-addr 127.0.0.1:$A_WEFT --workers 1 --log warn \
            >"$W/$name.log" 2>&1 & port=$P_WEFT; ready=127.0.0.1:$A_WEFT/ready ;;
    envoy) valgrind --tool=callgrind --callgrind-out-file="$out" "$ENVOY" -c "$W/envoy.yaml" \
            --concurrency 1 --log-level warn >"$W/$name.log" 2>&1 & port=$P_ENVOY; ready=127.0.0.1:$A_ENVOY/ready ;;
    haproxy) valgrind --tool=callgrind --callgrind-out-file="$out" haproxy -db -f "$W/haproxy.cfg" \
            >"$W/$name.log" 2>&1 & port=$P_HA; ready=127.0.0.1:$P_HA/ ;;
  esac
  local vg=$!
  local deadline=$((SECONDS + 120))
  until curl -sf -o /dev/null "$ready"; do
    [ $SECONDS -lt $deadline ] || { echo "$name not ready" >&2; tail "$W/$name.log" >&2; exit 1; }
    sleep 0.2
  done
  local n
  n=$(wrk -t1 -c8 -d"${dur}s" "http://127.0.0.1:$port/" | awk '/requests in/{print $1}')
  kill -TERM $vg; wait $vg || true
  echo "$n $(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')"
}

nginx -c "$W/nginx.conf" -p "$W" & NGINX=$!
trap 'kill $NGINX 2>/dev/null; rm -rf "$W"' EXIT
declare -A per
for name in $names; do
  read -r n1 i1 < <(run $name 5)
  read -r n2 i2 < <(run $name 20)
  per[$name]=$(( (i2 - i1) / (n2 - n1) ))
  echo "$name: $((n2 - n1)) requests, ${per[$name]} instructions/request"
done
mkdir -p bench/results
{
  echo "# Instructions per request (callgrind, HTTP/1.1 keep-alive, wrk -c8, one worker each)"
  echo
  echo "| proxy | instructions/request | weft's advantage |"
  echo "|---|---|---|"
  for name in $names; do
    echo "| $name | ${per[$name]} | $(python3 -c "print(f'{${per[$name]}/${per[weft]}:.2f}×')") |"
  done
} | tee bench/results/instructions.md
