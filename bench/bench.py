"""pmemblk benchmarks: peers side by side, measured in one run (see docs/benchmarks.md).

    python3 bench/bench.py run  [--quick] [--out FILE] [--baseline REV]
                                                           # host part, then the VM part
    python3 bench/bench.py part {host,vm} [--quick] --out FILE
    python3 bench/bench.py render FILE                     # table + plots into docs/
    python3 bench/bench.py stats-cost [--quick] [--out FILE]  # pmemblk with and without stats
    python3 bench/bench.py scale-out [--quick] [--out FILE]   # VM: one target, RAID0, RAID1
    python3 bench/bench.py native [--quick] [--out FILE]      # current VM: flush methods
    python3 bench/bench.py tls-cost [--quick] [--out FILE]    # pmemblk over TCP, TLS or not

Backends: nbdkit's ``memory`` plugin (C), a trivial in-memory Python plugin (the Python
ceiling), pmemblk over TCP, and in the VM pmemblk over Soft-RoCE and perftest on the same rxe.
With ``--baseline REV``, pmemblk as it was at git revision REV too (target and plugin from a
worktree under .bench/), so that a change is measured against its predecessor in one run.
Every nbdkit runs with the worker-thread count ``pmemblk attach`` uses.
Machine noise is large here: every number is repeated, and results are reported as ratios to
baselines measured in the same run, with their spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pmemblk.attachments import NBDKIT_THREADS
from pmemblk.auth import create_secret

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = str(ROOT / "plugin" / "pmemblk.py")
MEMPLUGIN = str(ROOT / "bench" / "memory_plugin.py")
PY = sys.executable
ADDR = os.environ.get("PMEMBLK_VM_ADDR", "192.0.2.1")
SIZE = 256 << 20

JOBS: dict[str, dict[str, Any]] = {
    "randread-4k-qd1": {"rw": "randread", "bs": "4k", "iodepth": 1},
    "randread-4k-qd16": {"rw": "randread", "bs": "4k", "iodepth": 16},
    "randwrite-4k-qd1": {"rw": "randwrite", "bs": "4k", "iodepth": 1},
    "randwrite-4k-qd16": {"rw": "randwrite", "bs": "4k", "iodepth": 16},
    "read-1m": {"rw": "read", "bs": "1M", "iodepth": 4},
    "write-1m": {"rw": "write", "bs": "1M", "iodepth": 4},
    "randwrite-4k-qd16-4conn": {"rw": "randwrite", "bs": "4k", "iodepth": 16, "conns": 4},
}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


class Server:
    """One backend behind an nbdkit Unix socket (and a pmemblk target where needed)."""

    def __init__(self, name: str, work: Path) -> None:
        self.name, self.work = name, work
        self.sock = work / f"{name.replace('@', '-')}.sock"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, flush: str = "auto", extra: tuple[str, ...] = (),
              threads: int = NBDKIT_THREADS) -> Server:
        nbdkit = ["nbdkit", "-f", "-U", str(self.sock), f"--threads={threads}"]
        # pmemblk-tcp@REV: target and plugin from that revision's worktree (baseline()).
        kind, _, rev = self.name.partition("@")
        tree = baseline_tree(rev) if rev else ROOT
        # python -m puts the working directory first on sys.path: the tree's own folder.
        env = dict(os.environ, PYTHONPATH=str(tree)) if rev else None
        cwd = tree
        if self.name == "nbdkit-memory":
            cmd = [*nbdkit, "memory", str(SIZE)]
        elif self.name == "python-memory":
            cmd = [*nbdkit, "python", MEMPLUGIN, f"size={SIZE}"]
        else:
            region = self.work / "region.img" if kind == "pmemblk-tcp" \
                else Path("/dev/shm/pmemblk-bench.img")
            region.unlink(missing_ok=True)
            subprocess.run([PY, "-m", "pmemblk", "create", str(region), "--size",
                            str(SIZE + 4096)], check=True, capture_output=True, env=env,
                           cwd=cwd)
            pid = self.work / f"{self.name}.pid"
            pid.unlink(missing_ok=True)
            auth: list[str] = []
            tls: list[str] = []
            if kind == "pmemblk-tcp":
                listen, transport = f"unix:{self.work / 'target.sock'}", "tcp"
            elif kind in ("pmemblk-tcp-lo", "pmemblk-tcp-tls"):  # TCP loopback (tls_cost)
                listen, transport = f"127.0.0.1:{free_port()}", "tcp"
                if kind == "pmemblk-tcp-tls":
                    certs = tls_certificates(self.work)
                    tls = ["--tls", "require", "--tls-certificates", str(certs)]
                    extra = (*extra, "tls=require", f"tls-certificates={certs}")
            else:
                listen, transport = f"{ADDR}:7500", "verbs"
                secret = self.work / "secret"
                if not secret.exists():
                    create_secret(str(secret))
                auth = [f"secret-file={secret}"]
            target = subprocess.Popen(
                [PY, "-m", "pmemblk", "serve", str(region), "--listen", listen, "--transport",
                 transport, "--pid-file", str(pid), "--shared",
                 *(["--secret-file", auth[0].split("=", 1)[1]] if auth else []), *tls],
                stderr=subprocess.DEVNULL, env=env, cwd=cwd)
            self.procs.append(target)
            wait_for(pid, target, "the target")
            keys = [f"target={listen}", f"transport={transport}", f"flush={flush}", *auth]
            if flush == "apm":
                keys.append("allow-visibility-only=true")
            keys += extra
            cmd = [*nbdkit, "python", str(tree / "plugin" / "pmemblk.py"), *keys]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
        self.procs.append(proc)
        wait_for(self.sock, proc, self.name)
        return self

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        self.sock.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_certificates(work: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 under ``work`` (made once)."""
    from pmemblk.tls import make_certificates

    certs = work / "tls"
    if not (certs / "server-cert.pem").exists():
        make_certificates(str(certs), server=["127.0.0.1"])
    return certs


@contextlib.contextmanager
def served(name: str, work: Path, flush: str = "auto", extra: tuple[str, ...] = (),
           threads: int = NBDKIT_THREADS) -> Iterator[Server]:
    server = Server(name, work).start(flush, extra, threads)
    try:
        yield server
    finally:
        server.stop()


def baseline_tree(rev: str) -> Path:
    """A worktree of ``rev`` under .bench/ (inside the checkout, so the VM sees it too)."""
    tree = ROOT / ".bench" / rev
    if not (tree / "pmemblk").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force",
                        str(tree), rev], check=True, capture_output=True)
    return tree


@contextlib.contextmanager
def nbd_device(server: Server, conns: int) -> Iterator[str]:
    """The kernel NBD client (VM part): /dev/nbd0 with ``conns`` connections (nbd-client -C;
    every backend here advertises multi-conn)."""
    dev = "/dev/nbd0"
    try:
        subprocess.run(["nbd-client", "-N", "bench", "-u", str(server.sock), dev, "-b", "4096",
                        *(["-C", str(conns)] if conns > 1 else [])],
                       check=True, capture_output=True)
        yield dev
    finally:
        subprocess.run(["nbd-client", "-d", dev], capture_output=True)
        deadline = time.monotonic() + 30
        while Path(f"/sys/block/{dev[5:]}/pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def fio(target: list[str], job: dict[str, Any], runtime: int) -> dict[str, float]:
    """One fio run; IOPS, MB/s and completion-latency percentiles (µs)."""
    conns = int(job.get("conns", 1))
    cmd = ["fio", "--name=bench", "--output-format=json", "--time_based",
           f"--runtime={runtime}", "--ramp_time=1", f"--rw={job['rw']}", f"--bs={job['bs']}",
           f"--iodepth={job['iodepth']}", "--size=128M", "--group_reporting",
           f"--numjobs={conns}", *target]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed: {res.stderr.strip()[-300:]}")
    data = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    side = data["read"] if "read" in job["rw"] else data["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mbps": float(side["bw_bytes"]) / 1e6,
        "p50_us": float(pct.get("50.000000", 0)) / 1000,
        "p99_us": float(pct.get("99.000000", 0)) / 1000,
        "ios": float(side.get("total_ios", 0)),
    }


FLUSH_PROBE = """
import nbd, os, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
n = int(sys.argv[2]); lat = []
for i in range(n):
    h.pwrite(os.urandom(4096), (i * 4096) % (64 << 20))
    t = time.perf_counter(); h.flush(); lat.append(time.perf_counter() - t)
h.shutdown()
lat.sort()
print(lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6)
"""


def flush_latency(uri: str, n: int) -> dict[str, float]:
    res = subprocess.run([PY, "-c", FLUSH_PROBE, uri, str(n)], capture_output=True, text=True,
                         timeout=600, check=True)
    p50, p99 = map(float, res.stdout.split())
    return {"p50_us": p50, "p99_us": p99}


def perftest(quick: bool) -> dict[str, float]:
    """ib_read_lat / ib_write_lat (4 KiB) and ib_write_bw (1 MiB) on rxe0, in the VM."""
    out: dict[str, float] = {}
    iters = "300" if quick else "2000"
    for tool, size, key in (("ib_read_lat", "4096", "read_lat_us"),
                            ("ib_write_lat", "4096", "write_lat_us"),
                            ("ib_read_lat", "8", "read8_lat_us"),
                            ("ib_write_bw", "1048576", "write_bw_mbps")):
        n = "200" if tool == "ib_write_bw" else iters
        # Under TCG a run now and then reports "inf" (its clock calibration failed): again.
        for attempt in range(3):
            value = _perftest_once(tool, size, n)
            if value is not None:
                out[key] = value
                break
            log(f"perftest {tool} -s {size}: no numeric result (try {attempt + 1} of 3)")
        else:
            raise RuntimeError(f"{tool} -s {size}: no numeric result in 3 runs")
    return out


def _perftest_once(tool: str, size: str, n: str) -> float | None:
    server = subprocess.Popen([tool, "-d", "rxe0", "-s", size, "-n", n],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            res = subprocess.run([tool, "-d", "rxe0", "-s", size, "-n", n, ADDR],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                break
            time.sleep(0.2)  # the server side is still starting
        row = [line.split() for line in res.stdout.splitlines()
               if re.match(r"^\s*\d+\s+\d+\s+[\d.]", line)]
        # lat: bytes iters t_min t_max t_typical t_avg ...; bw: bytes iters peak avg ...
        return float(row[-1][3 if tool == "ib_write_bw" else 4]) if row else None
    finally:
        server.kill()
        server.wait()


NATIVE_PROBE = """
import json, os, sys, time
from pmemblk.auth import load_secret
from pmemblk.client import Client
from pmemblk.transport.verbs import VerbsTransport
addr, port, secret, method = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
n = int(sys.argv[5])
c = Client(VerbsTransport(addr, port, secret=load_secret(secret)), method,
           allow_visibility_only=True)
assert c.flush_method == method, c.flush_method
block = memoryview(os.urandom(4096))
out = {"persistent": c.persistent, "flush": [], "fua": [], "write": []}
for i in range(n):
    off = (i * 4096) % (32 << 20)
    t = time.perf_counter(); c.pwrite(block, off); out["write"].append(time.perf_counter() - t)
    t = time.perf_counter(); c.flush(); out["flush"].append(time.perf_counter() - t)
    t = time.perf_counter(); c.pwrite(block, off + (32 << 20), fua=True)
    out["fua"].append(time.perf_counter() - t)
c.close()
def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6
print(json.dumps({"persistent": out["persistent"],
                  **{f"{k}_p50_us": pct(v, 0.5) for k, v in out.items() if k != "persistent"},
                  **{f"{k}_p99_us": pct(v, 0.99) for k, v in out.items() if k != "persistent"}}))
"""


def probe(script: str, what: str, *args: str) -> dict[str, Any]:
    """Run a probe script (one client, its own process); the JSON of its last line."""
    res = subprocess.run([PY, "-c", script, *args], capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{what}: {res.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def native_latency(quick: bool) -> dict[str, Any]:
    """In the current flavour's VM, on its NVDIMM: a 4 KiB write then a FLUSH, and a 4 KiB FUA
    write, per flush method, from one client (no nbdkit: the verbs themselves), interleaved
    with perftest's ib_write_lat/ib_read_lat on the same rxe, in each repeat."""
    repeats, n = (2, 100) if quick else (5, 400)
    dax = "/dev/dax0.0"
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    secret = work / "secret"
    create_secret(str(secret))
    subprocess.run([PY, "-m", "pmemblk", "create", dax, "--force"], check=True,
                   capture_output=True)
    pid = work / "target.pid"
    target = subprocess.Popen([PY, "-m", "pmemblk", "serve", dax, "--listen", f"{ADDR}:7600",
                               "--pid-file", str(pid), "--shared", "--secret-file", str(secret)],
                              stderr=subprocess.DEVNULL)
    result: dict[str, Any] = {"repeats": repeats, "n": n, "methods": {}, "perftest": []}
    try:
        wait_for(pid, target, "the target")
        for r in range(repeats):
            for method in ("native", "apm", "gpspm"):
                m = probe(NATIVE_PROBE, method, ADDR, "7600", str(secret), method, str(n))
                result["methods"].setdefault(method, []).append(m)
                log(f"native #{r + 1} {method}: flush p50 {m['flush_p50_us']:.0f} us, "
                    f"FUA write p50 {m['fua_p50_us']:.0f} us")
            result["perftest"].append(perftest(quick))
            log(f"native #{r + 1} perftest: {result['perftest'][-1]}")
    finally:
        target.send_signal(signal.SIGTERM)
        target.wait()
        shutil.rmtree(work, ignore_errors=True)
    return result


ATOMIC_PROBE = """
import json, os, random, sys, time
from pmemblk.auth import load_secret
from pmemblk.client import Client
from pmemblk.transport.verbs import VerbsTransport
addr, port, secret, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = Client(VerbsTransport(addr, port, secret=load_secret(secret)), "gpspm")
rng = random.Random(1)
block, buf = memoryview(os.urandom(4096)), memoryview(bytearray(4096))
blocks = c.size // 4096
out = {"write": [], "fua": [], "read": []}
for i in range(n):
    off = rng.randrange(blocks) * 4096
    t = time.perf_counter(); c.pwrite(block, off); out["write"].append(time.perf_counter() - t)
    t = time.perf_counter(); c.pwrite(block, off, fua=True)
    out["fua"].append(time.perf_counter() - t)
    t = time.perf_counter(); c.pread(buf, off); out["read"].append(time.perf_counter() - t)
c.close()
def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6
print(json.dumps({**{f"{k}_p50_us": pct(v, 0.5) for k, v in out.items()},
                  **{f"{k}_p99_us": pct(v, 0.99) for k, v in out.items()},
                  **{f"{k}_iops": len(v) / sum(v) for k, v in out.items()}}))
"""


def atomic_cost(quick: bool) -> dict[str, Any]:
    """In the VM, over rxe with flush=gpspm: 4 KiB random writes (plain, and FUA: persistent
    when acknowledged, as every write on atomic blocks is) and reads, one at a time from one
    client (no nbdkit), on a plain region and on an atomic-blocks one, in turns."""
    repeats, n = (2, 100) if quick else (5, 400)
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    secret = work / "secret"
    create_secret(str(secret))
    targets = []
    result: dict[str, Any] = {"repeats": repeats, "n": n, "layouts": {}}
    try:
        for port, layout in ((7610, "plain"), (7611, "atomic blocks")):
            region = f"/dev/shm/pmemblk-bench-{port}.img"
            subprocess.run([PY, "-m", "pmemblk", "create", region, "--size", "64M", "--force",
                            *(["--atomic-blocks"] if layout != "plain" else [])],
                           check=True, capture_output=True)
            pid = work / f"target-{port}.pid"
            targets.append(subprocess.Popen(
                [PY, "-m", "pmemblk", "serve", region, "--listen", f"{ADDR}:{port}",
                 "--pid-file", str(pid), "--secret-file", str(secret)],
                stderr=subprocess.DEVNULL))
            wait_for(pid, targets[-1], "the target")
        for r in range(repeats):
            for port, layout in ((7610, "plain"), (7611, "atomic blocks")):
                m = probe(ATOMIC_PROBE, layout, ADDR, str(port), str(secret), str(n))
                result["layouts"].setdefault(layout, []).append(m)
                log(f"atomic #{r + 1} {layout}: write p50 {m['write_p50_us']:.0f} us "
                    f"({m['write_iops']:.0f} IOPS), read p50 {m['read_p50_us']:.0f} us")
    finally:
        for t in targets:
            t.send_signal(signal.SIGTERM)
            t.wait()
        for port in (7610, 7611):
            Path(f"/dev/shm/pmemblk-bench-{port}.img").unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return result


def connect_cost(quick: bool) -> dict[str, Any]:
    """On the host, over a Unix socket (TCP transport): the time to connect (the whole
    handshake) and close, one connection at a time, to a target with one --secret-file and to
    targets with a --clients file of 1 and of 1000 identities (the connecting one last)."""
    from pmemblk.auth import load_secret
    from pmemblk.transport.stream import StreamTransport

    repeats, n = (2, 50) if quick else (5, 300)
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    create_secret(str(work / "secret"))
    secret = load_secret(str(work / "secret"))
    kinds = {"secret-file": ("--secret-file", str(work / "secret")), "clients-1": (),
             "clients-1000": ()}
    for kind, count in (("clients-1", 1), ("clients-1000", 1000)):
        clients = work / f"{kind}.txt"
        clients.write_text("".join(f"host{i} rw secret\n" for i in range(count - 1))
                           + "me rw secret\n")
        clients.chmod(0o600)
        kinds[kind] = ("--clients", str(clients))
    result: dict[str, Any] = {"repeats": repeats, "n": n, "kinds": {}}
    targets = []
    try:
        region = work / "region.img"
        subprocess.run([PY, "-m", "pmemblk", "create", str(region), "--size", "16M"],
                       check=True, capture_output=True)
        for kind, opts in kinds.items():
            pid = work / f"{kind}.pid"
            targets.append(subprocess.Popen(
                [PY, "-m", "pmemblk", "serve", str(region), "--readonly", "--listen",
                 f"unix:{work / kind}.sock", "--transport", "tcp", "--pid-file", str(pid),
                 *opts], stderr=subprocess.DEVNULL))
            wait_for(pid, targets[-1], "the target")
        for r in range(repeats):
            for kind in kinds:
                identity = "" if kind == "secret-file" else "me"
                took = []
                for _ in range(n):
                    began = time.perf_counter()
                    StreamTransport(f"unix:{work / kind}.sock", readonly=True, secret=secret,
                                    identity=identity).close()
                    took.append(time.perf_counter() - began)
                took.sort()
                p50 = took[len(took) // 2] * 1e6
                result["kinds"].setdefault(kind, []).append(p50)
                log(f"connect #{r + 1} {kind}: p50 {p50:.0f} us")
    finally:
        for t in targets:
            t.send_signal(signal.SIGTERM)
            t.wait()
        shutil.rmtree(work, ignore_errors=True)
    base = sorted(result["kinds"]["secret-file"])[repeats // 2]
    result["ratio_to_secret_file"] = {
        kind: round(sorted(v)[repeats // 2] / base, 3) for kind, v in result["kinds"].items()}
    return result


def job_groups() -> list[tuple[int, list[tuple[str, dict[str, Any]]]]]:
    """The jobs by their number of NBD connections (each group gets its own nbdkit)."""
    groups: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for name, job in JOBS.items():
        groups.setdefault(int(job.get("conns", 1)), []).append((name, job))
    return sorted(groups.items())


def run_part(part: str, quick: bool, baseline: str = "") -> dict[str, Any]:
    repeats, runtime = (2, 3) if quick else (5, 10)
    backends = ["nbdkit-memory", "python-memory", "pmemblk-tcp"]
    if baseline:
        backends.append(f"pmemblk-tcp@{baseline}")
    if part == "vm":
        backends.append("pmemblk-rdma")
        if baseline:
            backends.append(f"pmemblk-rdma@{baseline}")
    result: dict[str, Any] = {"repeats": repeats, "runtime_s": runtime, "fio": {},
                              "flush": {}, "nbdkit_threads": NBDKIT_THREADS,
                              "baseline": baseline}
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    progress = tqdm(total=len(backends) * repeats * len(JOBS), unit="run", desc=f"bench {part}",
                    disable=not sys.stderr.isatty(), leave=False)
    try:
        for backend in backends:
            result["fio"][backend] = {name: [] for name in JOBS}
            for r, (conns, jobs) in ((r, group) for r in range(repeats)
                                     for group in job_groups()):
                # nbdkit's worker threads are per NBD connection: the same total for every
                # backend and job, shared by the connections, as pmemblk attach does.
                with served(backend, work, threads=max(1, NBDKIT_THREADS // conns)) as server:
                    for name, job in jobs:
                        progress.set_postfix_str(f"{backend} {name} #{r + 1}")
                        progress.update()
                        try:
                            if part == "host":
                                m = fio(["--ioengine=nbd", f"--uri={server.uri}"], job, runtime)
                            else:
                                with nbd_device(server, int(job.get("conns", 1))) as dev:
                                    m = fio(["--ioengine=libaio", "--direct=1",
                                             f"--filename={dev}"], job, runtime)
                        except (RuntimeError, subprocess.SubprocessError) as exc:
                            log(f"{part} {backend} {name} #{r + 1} failed: {exc}")
                            continue
                        result["fio"][backend][name].append(m)
                        log(f"{part} {backend} {name} #{r + 1}: {m['iops']:.0f} IOPS "
                            f"{m['mbps']:.1f} MB/s p50 {m['p50_us']:.0f} us")
        n = 200 if quick else 1000
        for backend, flush in (("python-memory", "auto"), ("pmemblk-tcp", "gpspm"),
                               ("pmemblk-tcp", "apm")) + ((("pmemblk-rdma", "gpspm"),
                                                          ("pmemblk-rdma", "apm"))
                                                         if part == "vm" else ()):
            key = backend if backend == "python-memory" else f"{backend}/{flush}"
            result["flush"][key] = []
            for _ in range(repeats):
                with served(backend, work, flush) as server:
                    result["flush"][key].append(flush_latency(server.uri, n))
            log(f"{part} flush {key}: p50 {result['flush'][key][-1]['p50_us']:.0f} us")
        if part == "vm":
            result["perftest"] = [perftest(quick) for _ in range(repeats)]
            log(f"vm perftest: {result['perftest'][-1]}")
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


STATS_JOBS = ("randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd16", "read-1m")


def stats_cost(quick: bool) -> dict[str, Any]:
    """pmemblk over TCP with statistics on (the default) and off (stats=false), the two
    alternating in each repeat so that machine noise falls on both alike."""
    repeats, runtime = (3, 3) if quick else (7, 8)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "repeats": repeats, "runtime_s": runtime,
                              "on": {j: [] for j in STATS_JOBS},
                              "off": {j: [] for j in STATS_JOBS}}
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    progress = tqdm(total=repeats * 2 * len(STATS_JOBS), unit="run", desc="stats cost",
                    disable=not sys.stderr.isatty())
    try:
        for r in range(repeats):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for mode in order:
                with served("pmemblk-tcp", work, "auto", (f"stats={mode == 'on'}",)) as server:
                    for name in STATS_JOBS:
                        m = fio(["--ioengine=nbd", f"--uri={server.uri}"], JOBS[name], runtime)
                        result[mode][name].append(m)
                        progress.update()
                        log(f"stats {mode} {name} #{r + 1}: {m['iops']:.0f} IOPS")
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)
    result["counted_us"] = counted_cost()
    log(f"stats: counting one request costs {result['counted_us']:.2f} us of CPU")
    return result


def counted_cost(n: int = 200_000) -> float:
    """CPU time of Client._counted around an empty request (µs), with statistics on, less
    the same with them off: what each request pays."""
    from pmemblk.client import OPS, Client
    from pmemblk.stats import IoStats

    def per_call(enabled: bool) -> float:
        client = object.__new__(Client)  # no transport needed: only the counting is timed
        client.stats = IoStats(OPS, enabled=enabled)
        start = time.process_time()
        for _ in range(n):
            with client._counted("read", 4096):
                pass
        return (time.process_time() - start) / n * 1e6

    return min(per_call(True) for _ in range(3)) - min(per_call(False) for _ in range(3))


TLS_JOBS = ("randread-4k-qd16", "randwrite-4k-qd16", "read-1m", "write-1m")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tls_cost(quick: bool) -> dict[str, Any]:
    """pmemblk over TCP loopback without TLS and with tls=require (TLS 1.3), the two
    alternating in each repeat; fio's IOPS and MB/s, and the CPU time per request of nbdkit
    (the plugin) and of the target, read from /proc around each job (steadier than
    throughput on a busy machine: docs/benchmarks.md)."""
    repeats, runtime = (2, 2) if quick else (5, 8)
    modes = ("plain", "tls")
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "repeats": repeats, "runtime_s": runtime,
                              **{mode: {j: [] for j in TLS_JOBS} for mode in modes}}
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    progress = tqdm(total=repeats * 2 * len(TLS_JOBS), unit="run", desc="tls cost",
                    disable=not sys.stderr.isatty())
    try:
        for r in range(repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                backend = "pmemblk-tcp-tls" if mode == "tls" else "pmemblk-tcp-lo"
                with served(backend, work, "gpspm") as server:
                    target, nbdkit = server.procs[0].pid, server.procs[-1].pid
                    for name in TLS_JOBS:
                        before = cpu_seconds(nbdkit), cpu_seconds(target)
                        m = fio(["--ioengine=nbd", f"--uri={server.uri}"], JOBS[name], runtime)
                        after = cpu_seconds(nbdkit), cpu_seconds(target)
                        # fio's ramp time is not in total_ios: an overestimate, alike for both.
                        ios = max(m["ios"], 1.0)
                        m["nbdkit_cpu_us"] = (after[0] - before[0]) / ios * 1e6
                        m["target_cpu_us"] = (after[1] - before[1]) / ios * 1e6
                        result[mode][name].append(m)
                        progress.update()
                        log(f"tls-cost {mode} {name} #{r + 1}: {m['iops']:.0f} IOPS "
                            f"{m['mbps']:.1f} MB/s, CPU/request nbdkit "
                            f"{m['nbdkit_cpu_us']:.0f} us, target {m['target_cpu_us']:.0f} us")
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


SCALE_JOBS = ("randread-4k-qd16", "randwrite-4k-qd16", "read-1m", "write-1m")
SCALE_LAYOUTS = ("single", "raid0", "raid1")


def scale_out(quick: bool) -> dict[str, Any]:
    """In the VM: fio on one attached target, on md RAID0 over two, and on md RAID1 over two
    (created --assume-clean: a benchmark's data needs no initial resync), taking turns within
    each repeat. Attachments are made with pmemblk attach (docs/scale-out.md)."""
    repeats, runtime = (2, 3) if quick else (3, 8)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "repeats": repeats, "runtime_s": runtime,
                              **{layout: {j: [] for j in SCALE_JOBS} for layout in SCALE_LAYOUTS}}
    work = Path(tempfile.mkdtemp(prefix="pmemblk-bench-"))
    os.environ["PMEMBLK_RUN_DIR"] = str(work / "run")
    secret = work / "secret"
    create_secret(str(secret))
    targets = []
    progress = tqdm(total=repeats * len(SCALE_LAYOUTS) * len(SCALE_JOBS), unit="run",
                    desc="scale-out", disable=not sys.stderr.isatty())
    try:
        for i in range(2):
            region = Path(f"/dev/shm/pmemblk-bench-md{i}.img")
            region.unlink(missing_ok=True)
            subprocess.run([PY, "-m", "pmemblk", "create", str(region), "--size", str(SIZE)],
                           check=True, capture_output=True)
            pid = work / f"md{i}.pid"
            targets.append(subprocess.Popen(
                [PY, "-m", "pmemblk", "serve", str(region), "--listen", f"{ADDR}:{7600 + i}",
                 "--secret-file", str(secret), "--pid-file", str(pid)],
                stderr=subprocess.DEVNULL))
            wait_for(pid, targets[-1], "a target")
        for r in range(repeats):
            for layout in SCALE_LAYOUTS:
                members = 1 if layout == "single" else 2
                for i in range(members):
                    subprocess.run([PY, "-m", "pmemblk", "attach", f"{ADDR}:{7600 + i}",
                                    "--secret-file", str(secret), "--name", f"m{i}",
                                    "--device", f"/dev/nbd{i}"], check=True, capture_output=True)
                dev = "/dev/nbd0"
                if layout != "single":
                    dev = "/dev/md0"
                    free_members(["/dev/nbd0", "/dev/nbd1"])
                    subprocess.run(["mdadm", "--create", dev, "--run", f"--level={layout[-1]}",
                                    "--raid-devices=2", "--assume-clean", "/dev/nbd0",
                                    "/dev/nbd1"], check=True, capture_output=True)
                try:
                    for name in SCALE_JOBS:
                        m = fio(["--ioengine=libaio", "--direct=1", f"--filename={dev}"],
                                JOBS[name], runtime)
                        result[layout][name].append(m)
                        progress.update()
                        log(f"scale-out {layout} {name} #{r + 1}: {m['iops']:.0f} IOPS "
                            f"{m['mbps']:.1f} MB/s")
                finally:
                    if layout != "single":
                        subprocess.run(["mdadm", "--stop", dev], capture_output=True)
                        free_members(["/dev/nbd0", "/dev/nbd1"])  # no stale array next time
                    for i in range(members):
                        subprocess.run([PY, "-m", "pmemblk", "detach", "--force", f"m{i}"],
                                       capture_output=True)
    finally:
        progress.close()
        for t in targets:
            t.terminate()
            t.wait()
        shutil.rmtree(work, ignore_errors=True)
    return result


def free_members(devices: list[str]) -> None:
    """Undo udev's incremental assembly of an earlier layout's members, and its superblocks."""
    subprocess.run(["udevadm", "settle"], capture_output=True)
    for dev in devices:
        for holder in Path(f"/sys/block/{os.path.basename(dev)}/holders").iterdir():
            subprocess.run(["mdadm", "--stop", f"/dev/{holder.name}"], capture_output=True)
        subprocess.run(["mdadm", "--zero-superblock", dev], capture_output=True)


def in_vm(command: str, quick: bool, baseline: str = "") -> dict[str, Any] | None:
    """Run ``bench.py COMMAND`` in one VM boot; its JSON result, or None if it did not run.
    ``native`` runs in the current flavour (Debian 13, its python3, an NVDIMM)."""
    share = Path(tempfile.mkdtemp(prefix="pmemblk-bench-vm-"))
    out = share / "vm.json"
    if baseline:
        baseline_tree(baseline)  # made on the host: the VM sees the checkout read-only
    vm, py = [str(ROOT / "scripts" / "vm")], PY
    if command == "native":
        vm, py = [*vm, "--flavour", "current", "--pmem"], "python3"
    cmd = [*vm, "--out", str(share), "--", py, __file__, "part",
           command, "--out", str(out)] + (["--quick"] if quick else []) + (
               ["--baseline", baseline] if baseline else [])
    rc = subprocess.run(cmd).returncode
    result = json.loads(out.read_text()) if rc == 0 and out.exists() else None
    if result is None:
        log(f"the VM part did not run (exit {rc})")
    shutil.rmtree(share, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    r.add_argument("--no-vm", action="store_true")
    r.add_argument("--only", choices=["host", "vm"],
                   help="run one part and merge it into the existing --out file")
    p = sub.add_parser("part")
    p.add_argument("part", choices=["host", "vm", "scale-out", "native", "atomic"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    for each in (r, p):
        each.add_argument("--baseline", metavar="REV", default="",
                          help="also measure pmemblk as it was at this git revision")
    d = sub.add_parser("render")
    d.add_argument("file")
    for extra in ("stats-cost", "tls-cost", "connect-cost", "scale-out", "native", "atomic"):
        c = sub.add_parser(extra)
        c.add_argument("--quick", action="store_true")
        c.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    args = ap.parse_args()

    if args.cmd in ("scale-out", "native", "atomic"):
        if not Path(args.out).exists():
            log(f"{args.out} does not exist: run the whole bench first")
            return 1
        measured = in_vm(args.cmd, args.quick)
        if measured is None:
            return 1
        saved = json.loads(Path(args.out).read_text())
        saved[args.cmd.replace("-", "_")] = measured
        if args.cmd in ("native", "atomic"):
            measured["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        Path(args.out).write_text(json.dumps(saved, indent=1))
        from render import render

        render(saved)
        return 0

    if args.cmd in ("stats-cost", "tls-cost", "connect-cost"):
        saved = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else None
        if saved is None:
            log(f"{args.out} does not exist: run the whole bench first")
            return 1
        measure = {"stats-cost": stats_cost, "tls-cost": tls_cost,
                   "connect-cost": connect_cost}[args.cmd]
        saved[args.cmd.replace("-", "_")] = measure(args.quick)
        Path(args.out).write_text(json.dumps(saved, indent=1))
        from render import render

        render(saved)
        return 0

    if args.cmd == "part":
        if args.part == "scale-out":
            part = scale_out(args.quick)
        elif args.part == "native":
            part = native_latency(args.quick)
        elif args.part == "atomic":
            part = atomic_cost(args.quick)
        else:
            part = run_part(args.part, args.quick, args.baseline)
        Path(args.out).write_text(json.dumps(part, indent=1))
        return 0
    if args.cmd == "render":
        from render import render

        render(json.loads(Path(args.file).read_text()))
        return 0
    started = time.time()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "parts": {},
    }
    if Path(args.out).exists():
        saved = json.loads(Path(args.out).read_text())
        # Measured on their own (tls_cost, connect_cost: with the host part, kept for --only vm).
        for kept in ("stats_cost", "tls_cost", "connect_cost", "scale_out", "native"):
            if kept in saved:
                results[kept] = saved[kept]
        if args.only:
            results["parts"] = saved["parts"]
    if args.only != "vm":
        results["parts"]["host"] = run_part("host", args.quick, args.baseline)
        results["tls_cost"] = tls_cost(args.quick)
        results["connect_cost"] = connect_cost(args.quick)
    if not args.no_vm and args.only != "host":
        vm = in_vm("vm", args.quick, args.baseline)
        if vm is not None:
            results["parts"]["vm"] = vm
    results["duration_s"] = round(time.time() - started)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")
    from render import render

    render(results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
