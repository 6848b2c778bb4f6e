"""Render bench results: the generated part of docs/benchmarks.md and PNG plots in docs/img/."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
JOB_METRIC = {
    "randread-4k-qd1": "iops", "randread-4k-qd16": "iops", "randwrite-4k-qd1": "iops",
    "randwrite-4k-qd16": "iops", "read-1m": "mbps", "write-1m": "mbps",
    "randwrite-4k-qd16-4conn": "iops",
}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def spread(xs: list[float]) -> str:
    return f"{min(xs):.0f}–{max(xs):.0f}" if len(xs) > 1 else ""


def ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median ratio and its range over the repeats (paired by repeat)."""
    pairs = [a / b for a, b in zip(num, den, strict=False) if b]
    if not pairs:
        return 0.0, 0.0, 0.0
    return med(pairs), min(pairs), max(pairs)


def fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.0%} ({r[1]:.0%}–{r[2]:.0%})"


def values(part: dict[str, Any], backend: str, job: str, metric: str) -> list[float]:
    return [float(run[metric]) for run in part["fio"].get(backend, {}).get(job, [])]


def table(part: dict[str, Any], name: str) -> list[str]:
    backends = list(part["fio"])
    lines = [f"### {name}: fio ({part['repeats']} repeats × {part['runtime_s']} s, median and "
             f"range; nbdkit: {part.get('nbdkit_threads', 16)} worker threads in all, shared by "
             "the NBD connections)", "",
             "| job | " + " | ".join(backends) + " |",
             "|---" * (len(backends) + 1) + "|"]
    for job, metric in JOB_METRIC.items():
        unit = "MB/s" if metric == "mbps" else "IOPS"
        cells = []
        for b in backends:
            xs = values(part, b, job, metric)
            p50 = med(values(part, b, job, "p50_us"))
            cells.append(f"{med(xs):.0f} {unit} ({spread(xs)}), p50 {p50:.0f} µs" if xs else "—")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    lines += ["", "Flush latency (write 4 KiB, then time FLUSH alone), µs:", "",
              "| flush | p50 | p99 |", "|---|---|---|"]
    for key, runs in part["flush"].items():
        lines.append(f"| {key} | {med([r['p50_us'] for r in runs]):.0f} | "
                     f"{med([r['p99_us'] for r in runs]):.0f} |")
    if "perftest" in part:
        pt = part["perftest"]
        lines += ["", "perftest on rxe0 (the transport's limit): "
                  + ", ".join(f"{k} {med([p[k] for p in pt]):.1f}" for k in pt[0]), ""]
    return lines


def targets(parts: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, goal, measured, met) for the ratios issue 12 sets, each measured in one run."""
    rows: list[tuple[str, str, str, bool]] = []

    def to_ceiling(part: dict[str, Any], backend: str, job: str, metric: str, goal: float,
                   label: str) -> None:
        r = ratio(values(part, backend, job, metric), values(part, "python-memory", job, metric))
        rows.append((f"{label} {job} {metric.replace('mbps', 'MB/s').upper()} / Python ceiling",
                     f"≥ {goal:.0%}", fmt_ratio(r), r[0] >= goal))

    host = parts.get("host")
    if host:
        for job in ("randread-4k-qd16", "randwrite-4k-qd16"):
            to_ceiling(host, "pmemblk-tcp", job, "iops", 0.70, "host Unix socket")
        for job in ("read-1m", "write-1m"):
            to_ceiling(host, "pmemblk-tcp", job, "mbps", 0.95, "host Unix socket")
        base = host.get("baseline")
        if base:
            for job in ("randread-4k-qd1", "randwrite-4k-qd1"):
                r = ratio(values(host, "pmemblk-tcp", job, "iops"),
                          values(host, f"pmemblk-tcp@{base}", job, "iops"))
                rows.append((f"host {job} IOPS / the same at {base} (before)",
                             "≥ 97% (no worse, within noise)", fmt_ratio(r), r[0] >= 0.97))
    vm = parts.get("vm")
    if vm:
        to_ceiling(vm, "pmemblk-rdma", "randread-4k-qd16", "iops", 0.70, "VM verbs")
        to_ceiling(vm, "pmemblk-rdma", "randwrite-4k-qd16", "iops", 0.70, "VM verbs")
    for name, part in parts.items():
        backend = "pmemblk-rdma" if name == "vm" else "pmemblk-tcp"
        r = ratio(values(part, backend, "randwrite-4k-qd16-4conn", "iops"),
                  values(part, backend, "randwrite-4k-qd16", "iops"))
        how = "nbd-client -C 4" if name == "vm" else "4 NBD connections"
        rows.append((f"{name} {backend}: {how} / 1 (4k QD16 randwrite)", "≥ 1.0×",
                     f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})", r[0] >= 1.0))
    return rows


def plots(parts: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib is not installed: no plots)"]
    IMG.mkdir(parents=True, exist_ok=True)
    out = []
    for name, part in parts.items():
        base = "python-memory"
        others = [b for b in part["fio"] if b != base]
        jobs = list(JOB_METRIC)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(1, len(others))
        for i, b in enumerate(others):
            meds, lo, hi = [], [], []
            for job in jobs:
                r = ratio(values(part, b, job, JOB_METRIC[job]),
                          values(part, base, job, JOB_METRIC[job]))
                meds.append(r[0])
                lo.append(max(0.0, r[0] - r[1]))
                hi.append(max(0.0, r[2] - r[0]))
            xs = [j + i * width for j in range(len(jobs))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=b)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(jobs))])
        ax.set_xticklabels(jobs, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"ratio to {base} (same run)")
        ax.set_title(f"{name}: throughput relative to the Python ceiling (median, range)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = IMG / f"bench-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(f"![{name} ratios](img/{path.name})")
    return out


def stats_table(cost: dict[str, Any]) -> list[str]:
    """What the statistics cost: pmemblk over TCP with stats on vs stats=false."""
    lines = [f"### What the statistics cost ({cost['date']}, host, pmemblk over TCP, "
             f"{cost['repeats']} repeats × {cost['runtime_s']} s, on and off alternating)", "",
             "| job | stats on | stats=false | on / off (median, range) |", "|---|---|---|---|"]
    for job, runs in cost["on"].items():
        metric = JOB_METRIC[job]
        unit = "MB/s" if metric == "mbps" else "IOPS"
        on = [float(r[metric]) for r in runs]
        off = [float(r[metric]) for r in cost["off"][job]]
        lines.append(f"| {job} | {med(on):.0f} {unit} | {med(off):.0f} {unit} | "
                     f"{fmt_ratio(ratio(on, off))} |")
    if "counted_us" in cost:
        qd1 = med([float(r["iops"]) for r in cost["on"]["randread-4k-qd1"]])
        lines += ["", f"Counting one request (the clock pair, the bucket, the lock) costs "
                  f"{cost['counted_us']:.2f} µs of CPU (timed by bench.py stats-cost): "
                  f"{cost['counted_us'] * qd1 / 1e6:.1%} of a 4k QD1 read at {qd1:.0f} IOPS. "
                  "The end-to-end ratios above are within this machine's run-to-run noise."]
    return lines


def tls_table(cost: dict[str, Any]) -> list[str]:
    """What TLS costs: pmemblk over TCP loopback with tls=require against without."""
    lines = [f"### What TLS costs ({cost['date']}, host, pmemblk over TCP loopback, "
             f"{cost['repeats']} repeats × {cost['runtime_s']} s, TLS and plaintext "
             "alternating)", "",
             "| job | plaintext | TLS 1.3 | TLS / plaintext (median, range) | CPU per request, "
             "TLS / plaintext: nbdkit, target |", "|---|---|---|---|---|"]
    for job, runs in cost["plain"].items():
        metric = JOB_METRIC[job]
        unit = "MB/s" if metric == "mbps" else "IOPS"
        plain = [float(r[metric]) for r in runs]
        tls = [float(r[metric]) for r in cost["tls"][job]]
        cpu = [fmt_ratio(ratio([float(r[k]) for r in cost["tls"][job]],
                               [float(r[k]) for r in runs]))
               for k in ("nbdkit_cpu_us", "target_cpu_us")]
        lines.append(f"| {job} | {med(plain):.0f} {unit} | {med(tls):.0f} {unit} | "
                     f"{fmt_ratio(ratio(tls, plain))} | {cpu[0]}, {cpu[1]} |")
    return lines


def connect_table(cost: dict[str, Any]) -> list[str]:
    """What identities cost a connection (bench.py connect_cost)."""
    lines = [f"### Connect cost with identities (host, TCP over a Unix socket, the whole "
             f"handshake and close, p50 of {cost['n']} connections, median of "
             f"{cost['repeats']} repeats)", "",
             "| target authenticates with | connect + close | against --secret-file |",
             "|---|---|---|"]
    for kind, p50s in cost["kinds"].items():
        lines.append(f"| {kind} | {med([float(v) for v in p50s]):.0f} µs | "
                     f"{cost['ratio_to_secret_file'][kind]:.2f} |")
    return lines


def scale_table(scale: dict[str, Any]) -> list[str]:
    """One target against md RAID0 and RAID1 over two (docs/scale-out.md)."""
    lines = [f"### Scale-out: md over two targets ({scale['date']}, VM, Soft-RoCE under TCG, "
             f"fio libaio on /dev/nbd0 or /dev/md0, {scale['repeats']} repeats × "
             f"{scale['runtime_s']} s, layouts taking turns)", "",
             "| job | one target | RAID0 over two | RAID1 over two |", "|---|---|---|---|"]
    for job, runs in scale["single"].items():
        metric = JOB_METRIC[job]
        unit = "MB/s" if metric == "mbps" else "IOPS"
        one = [float(r[metric]) for r in runs]
        cells = [f"{med(one):.0f} {unit}"]
        for layout in ("raid0", "raid1"):
            xs = [float(r[metric]) for r in scale[layout][job]]
            cells.append(f"{med(xs):.0f} {unit}, {fmt_ratio(ratio(xs, one))} of one")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return lines


def native_table(native: dict[str, Any]) -> list[str]:
    """Flush methods on the current kernel's NVDIMM, as ratios to perftest in the same boot."""
    perf = native["perftest"]
    write_lat = [float(p["write_lat_us"]) for p in perf]
    read_lat = [float(p["read_lat_us"]) for p in perf]
    read8 = [float(p["read8_lat_us"]) for p in perf]
    lines = [f"### Flush methods on a current kernel ({native['date']}, VM --flavour current: "
             f"Linux 6.12 rxe, rdma-core 56, region on an emulated NVDIMM; {native['repeats']} "
             f"repeats × {native['n']} iterations from one client, no nbdkit; perftest in the "
             "same boot)", "",
             f"perftest, 4 KiB: ib_write_lat {med(write_lat):.0f} µs, ib_read_lat "
             f"{med(read_lat):.0f} µs; 8 B ib_read_lat {med(read8):.0f} µs (medians of the "
             "typical latency per repeat).", "",
             "| method | persistent | 4 KiB write, then FLUSH: FLUSH p50 | FLUSH / ib_read_lat 8 B "
             "| FUA 4 KiB write p50 | FUA / ib_write_lat 4 KiB | plain write p50 |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in native["methods"].items():
        flush = [float(r["flush_p50_us"]) for r in runs]
        fua = [float(r["fua_p50_us"]) for r in runs]
        write = [float(r["write_p50_us"]) for r in runs]
        persistent = "yes" if all(r["persistent"] for r in runs) else "visibility only"
        lines.append(f"| {method} | {persistent} | {med(flush):.0f} µs ({spread(flush)}) | "
                     f"{ratio(flush, read8)[0]:.1f}× ({ratio(flush, read8)[1]:.1f}–"
                     f"{ratio(flush, read8)[2]:.1f}) | {med(fua):.0f} µs ({spread(fua)}) | "
                     f"{ratio(fua, write_lat)[0]:.1f}× ({ratio(fua, write_lat)[1]:.1f}–"
                     f"{ratio(fua, write_lat)[2]:.1f}) | {med(write):.0f} µs |")
    return lines


def atomic_table(atomic: dict[str, Any]) -> list[str]:
    """What atomic blocks cost per 4 KiB write and read, as ratios to a plain region."""
    runs = atomic["layouts"]
    plain = runs["plain"]
    lines = [f"### Atomic blocks ({atomic['date']}, VM --flavour stable: Linux 6.1 rxe, "
             f"flush=gpspm, regions on /dev/shm; {atomic['repeats']} repeats × {atomic['n']} "
             "random 4 KiB writes, FUA writes and reads, one at a time from one client, no "
             "nbdkit)", "",
             "On atomic blocks every write is persistent when acknowledged, so its fair peer is "
             "a plain region's FUA write.", "",
             "| layout | write p50 | FUA write p50 | FUA write IOPS | FUA latency / plain FUA "
             "| FUA IOPS / plain FUA | read p50 | read latency / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for layout, rs in runs.items():
        w = [float(r["write_p50_us"]) for r in rs]
        f = [float(r["fua_p50_us"]) for r in rs]
        fi = [float(r["fua_iops"]) for r in rs]
        rd = [float(r["read_p50_us"]) for r in rs]
        pf = [float(r["fua_p50_us"]) for r in plain]
        pfi = [float(r["fua_iops"]) for r in plain]
        prd = [float(r["read_p50_us"]) for r in plain]
        lines.append(f"| {layout} | {med(w):.0f} µs | {med(f):.0f} µs ({spread(f)}) | "
                     f"{med(fi):.0f} | {ratio(f, pf)[0]:.2f}× ({ratio(f, pf)[1]:.2f}–"
                     f"{ratio(f, pf)[2]:.2f}) | {ratio(fi, pfi)[0]:.2f}× | {med(rd):.0f} µs | "
                     f"{ratio(rd, prd)[0]:.2f}× |")
    return lines


def render(results: dict[str, Any]) -> None:
    parts = results["parts"]
    lines = [BEGIN, "", f"Latest run: {results['date']}, {'quick' if results['quick'] else 'full'}"
             f" pass, {results.get('duration_s', 0)} s, {results['host']['cpus']} CPUs. Raw data: "
             "[benchmarks.json](benchmarks.json).", "", "### Targets", "",
             "| target | goal | measured (median, range) | met |", "|---|---|---|---|"]
    for name, goal, measured, met in targets(parts):
        lines.append(f"| {name} | {goal} | {measured} | {'yes' if met else '**no**'} |")
    lines.append("")
    for name, part in parts.items():
        lines += table(part, "Host (fio nbd engine)" if name == "host"
                       else "VM, Soft-RoCE under TCG (fio libaio on /dev/nbd0)")
        lines.append("")
    lines += plots(parts)
    if "stats_cost" in results:
        lines += ["", *stats_table(results["stats_cost"])]
    if "tls_cost" in results:
        lines += ["", *tls_table(results["tls_cost"])]
    if "connect_cost" in results:
        lines += ["", *connect_table(results["connect_cost"])]
    if "scale_out" in results:
        lines += ["", *scale_table(results["scale_out"])]
    if "native" in results:
        lines += ["", *native_table(results["native"])]
    if "atomic" in results:
        lines += ["", *atomic_table(results["atomic"])]
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + "\n".join(lines) + tail)
    print(f"rendered {DOC}")
