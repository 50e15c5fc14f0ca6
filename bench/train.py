#!/usr/bin/env python3
"""The training run of weft's profile-guided build (bench/pgo.sh): an instrumented weft-proxy
carries the benchmark's workloads for a few seconds each, so the profile sees the paths that
production traffic takes — HTTP/1.1 keep-alive, 1 KiB and 64 KiB bodies, HTTP/2 multiplexed, and
a sidecar pair over mTLS and in plaintext (workload certificates from weft-control's CA).

Loopback only; every load is bounded in time. The proxies are stopped with SIGTERM so that they
drain and exit normally: the instrumented binary writes its profile when it exits.
Usage: bench/train.py WEFT_PROXY WEFT_CONTROL [--seconds 3]
"""
import argparse, shutil, signal, sys, tempfile

from peers import write_configs
from run import Procs, free_port, h2load_mux, sidecar_pairs, start_nginx, start_weft, wait_port, wrk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weft")
    ap.add_argument("control")
    ap.add_argument("--seconds", type=int, default=3)
    args = ap.parse_args()
    s = args.seconds
    work = tempfile.mkdtemp(prefix="weft-train-")
    procs = Procs()
    try:
        up, port = free_port(), free_port()
        write_configs(work, up, port, free_port(), free_port(), free_port())
        start_nginx(procs, work, up)
        start_weft(procs, work, "weft", args.weft, port)
        wait_port(port)
        served = [("http1", wrk(port, s)["rps"] * s)]
        for size in ["1k", "64k"]:
            served.append((f"http1 {size}", wrk(port, s, path=f"/{size}")["rps"] * s))
        served.append(("http2 -m10", h2load_mux(port, s)["rps"] * s))
        pair = sidecar_pairs(procs, work, args.weft, args.control, up)
        for kind in ["plain", "tls"]:
            served.append((f"sidecar pair {kind}", wrk(pair[kind], s, host=kind)["rps"] * s))
        for name, n in served:
            if n <= 0:
                sys.exit(f"training: no request served in '{name}'")
            print(f"training: {name}: {n:.0f} requests")
        # SIGTERM first: the profile is written at a normal exit, never after SIGKILL.
        for p in procs.procs:
            p.send_signal(signal.SIGTERM)
        for p in procs.procs:
            try:
                p.wait(timeout=30)
            except Exception:
                print(f"training: pid {p.pid} did not exit after SIGTERM", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
