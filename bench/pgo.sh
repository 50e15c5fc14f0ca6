#!/usr/bin/env bash
# weft-proxy with profile-guided optimisation: an instrumented build, a training run of the
# benchmark's workloads on loopback (bench/train.py), and the optimised build from that profile.
# The result is target/pgo/release/weft-proxy (target/release stays the plain build).
#
# llvm-profdata must read the raw profiles of rustc's LLVM: the rustup component llvm-tools when
# the toolchain has it, else Debian's llvm-19 (checked: it reads the raw profiles of rustc 1.95,
# whose LLVM is 22; an older one, as Debian's llvm 14, fails the merge: "unsupported instrumentation
# profile format version").
# cargo rebuilds what changed since the last run with the new profile; the rest keeps the profile
# it was built with, which was made from the same code. (A profile that no longer matches a
# function's code is dropped for that function by LLVM: it costs speed, never correctness.)
# Needs what bench/run.sh installs. Usage: [WEFT_CONTROL=…] bench/pgo.sh [--seconds 3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE_DIR=$ROOT/target/pgo-profile
# The flags of .cargo/config.toml: RUSTFLAGS replaces them, so they are repeated here.
BASE_FLAGS="-C link-arg=-Wl,-z,pack-relative-relocs"

profdata() {
  local sysroot tool
  sysroot=$(rustc --print sysroot)
  tool=$(find "$sysroot" -name llvm-profdata -type f 2>/dev/null | head -1)
  [ -n "$tool" ] && { echo "$tool"; return; }
  if [ ! -x /usr/lib/llvm-19/bin/llvm-profdata ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq llvm-19 >/dev/null
  fi
  echo /usr/lib/llvm-19/bin/llvm-profdata
}
PROFDATA=$(profdata)

rm -rf "$PROFILE_DIR"
mkdir -p "$PROFILE_DIR"
RUSTFLAGS="$BASE_FLAGS -Cprofile-generate=$PROFILE_DIR" CARGO_TARGET_DIR=target/pgo-gen \
  cargo build --release --locked -p weft-proxy
# The training's sidecar pair takes its certificates from weft-control: the one in
# $WEFT_CONTROL (bench/run.sh passes its release build), else one built here.
if [ -z "${WEFT_CONTROL:-}" ]; then
  CARGO_TARGET_DIR=target/pgo-train cargo build --release --locked -p weft-control
  WEFT_CONTROL=target/pgo-train/release/weft-control
fi
python3 bench/train.py target/pgo-gen/release/weft-proxy "$WEFT_CONTROL" "$@"
compgen -G "$PROFILE_DIR/*.profraw" >/dev/null || { echo "pgo: the training run wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$PROFILE_DIR/weft.profdata" "$PROFILE_DIR"/*.profraw
RUSTFLAGS="$BASE_FLAGS -Cprofile-use=$PROFILE_DIR/weft.profdata" CARGO_TARGET_DIR=target/pgo \
  cargo build --release --locked -p weft-proxy
echo "pgo: target/pgo/release/weft-proxy (profile $PROFILE_DIR/weft.profdata)"
