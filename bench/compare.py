#!/usr/bin/env python3
"""Two or more builds of weft-proxy side by side with HAProxy, for judging one change to the
data plane: scenario (a) of bench/run.py (HTTP/1.1 keep-alive, wrk -c32, one worker each, nginx
upstream), in rounds that rotate the order so every build meets the machine's drift at every
position. Reports per build the median req/s, the proxy's user and system CPU per request, and
the median of its per-round ratio to HAProxy (the figure that cancels drift).

Loopback only; every run is bounded by --duration.
Usage: bench/compare.py BIN [BIN ...] [--rounds 6] [--duration 8]
"""
import argparse, os, shutil, statistics, sys, tempfile

from peers import write_configs
from run import Procs, cpu_split, free_port, start_nginx, start_weft, wait_port, wrk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bins", nargs="+", help="weft-proxy binaries to compare")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=8)
    args = ap.parse_args()
    for b in args.bins:
        if not os.access(b, os.X_OK):
            sys.exit(f"compare: {b} is not an executable")
    work = tempfile.mkdtemp(prefix="weft-compare-")
    procs = Procs()
    try:
        up, haproxy = free_port(), free_port()
        write_configs(work, up, free_port(), free_port(), free_port(), haproxy)
        start_nginx(procs, work, up)
        targets = {}  # name -> (port, pid)
        for i, b in enumerate(args.bins):
            port = free_port()
            p = start_weft(procs, work, f"weft{i}", b, port)
            targets[f"{i}: {b}"] = (port, p.pid)
        p = procs.start("haproxy", ["haproxy", "-f", os.path.join(work, "haproxy.cfg")], work)
        targets["haproxy"] = (haproxy, p.pid)
        for port, _ in targets.values():
            wait_port(port)
        order = list(targets)
        for t in order:  # warm-up
            wrk(targets[t][0], 2)
        runs = {t: [] for t in order}
        for r in range(args.rounds):
            for t in order[r % len(order):] + order[:r % len(order)]:
                port, pid = targets[t]
                before = cpu_split(pid)
                res = wrk(port, args.duration)
                after = cpu_split(pid)
                if res["non2xx"] or res["socket_errors"]:
                    sys.exit(f"compare: {t}: {res['non2xx']} non-2xx, {res['socket_errors']} socket errors")
                n = res["rps"] * args.duration
                runs[t].append({"rps": res["rps"], "user_us": (after[0] - before[0]) * 1e6 / n,
                                "sys_us": (after[1] - before[1]) * 1e6 / n})
            print(f"round {r + 1}: " + ", ".join(f"{t.split(':')[0]} {runs[t][-1]['rps']:.0f}" for t in order),
                  flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    med = lambda t, k: statistics.median(x[k] for x in runs[t])
    print("\n| build | req/s (median) | user µs/req | system µs/req | / HAProxy, per-round median (range) |")
    print("|---|---|---|---|---|")
    for t in order:
        ratios = sorted(a["rps"] / h["rps"] for a, h in zip(runs[t], runs["haproxy"]))
        print(f"| {t} | {med(t, 'rps'):.0f} | {med(t, 'user_us'):.2f} | {med(t, 'sys_us'):.2f} | "
              f"{statistics.median(ratios):.3f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) |")


if __name__ == "__main__":
    sys.exit(main())
