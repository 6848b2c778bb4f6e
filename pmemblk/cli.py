"""The ``pmemblk`` command: create, info, serve, reload, secret, tls-certificates, attach, ...

Exit status: 0 success, 1 a pmemblk error (the message says what to do), 2 bad usage,
130 interrupted. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from . import __version__, atomicblocks, layout
from .address import UnixAddress, parse_address
from .auth import create_secret, load_secret
from .errors import ConfigError, LayoutError, PmemblkError, ServiceError
from .lock import path_holder
from .memkind import region_kind
from .pmem import PmemRegion, is_devdax
from .provision import create_region
from .units import human, parse_size

log = logging.getLogger("pmemblk")

#: Upper bound for --max-clients and --max-handshakes (each connection holds descriptors).
MAX_CONNECTIONS = 65536


def cmd_create(args: argparse.Namespace) -> None:
    path: str = args.path
    size = parse_size(args.size) if args.size is not None else None
    if args.lanes is not None and not args.atomic_blocks:
        raise ConfigError("--lanes is for --atomic-blocks regions only")
    lanes = None
    if args.atomic_blocks:
        lanes = atomicblocks.DEFAULT_LANES if args.lanes is None else args.lanes
    with progress_bar(size, f"allocating {path}") as progress:
        made = create_region(path, size, args.block_size, args.force, progress, lanes)
    header, atomic = made.header, made.atomic
    if atomic is not None:
        what = (f"{human(atomic.export_size)} of atomic blocks ({atomic.external_blocks} "
                f"sectors of {atomic.sector_size} bytes, {atomic.lanes} lanes)")
    else:
        what = (f"{human(header.data_size)} of data ({header.data_size // header.block_size} "
                f"blocks of {header.block_size} bytes)")
    print(f"created {path}: {what}, uuid {header.uuid}, is_pmem={int(made.is_pmem)} "
          f"(persistence by {made.persist_method})")


#: Work over this many bytes shows a progress bar (on a terminal).
PROGRESS_FROM = 1 << 30


@contextlib.contextmanager
def progress_bar(total: int | None, what: str) -> Iterator[Callable[[int], None] | None]:
    """A progress callback (bytes done so far) drawing on stderr if it is a terminal and the
    work is big; None otherwise."""
    if total is None or total < PROGRESS_FROM or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
              leave=False) as bar:
        yield lambda done: bar.update(done - bar.n)


def region_info(path: str) -> dict[str, object]:
    with PmemRegion.open(path) as region:
        header = layout.read_header(region)
        state = layout.read_state(region)
        return {
            "path": path,
            "kind": "devdax" if is_devdax(path) else "file",
            "region_size": region.size,
            "is_pmem": region.is_pmem,
            "persistence": region.persist_method,
            "memory": region.memory.describe(),
            "memory_persistent": region.memory.persistent,
            "layout_version": header.version,
            "uuid": str(header.uuid),
            "block_size": header.block_size,
            "data_offset": header.data_offset,
            "data_size": header.data_size,
            "created_ns": header.created_ns,
            **_atomic_info(region, header),
            "clean_shutdown": state.clean,
            "times_served": state.times_served,
            "loss_epoch": _loss_epoch(region),
            "locked_by_pid": path_holder(path),
        }


def _loss_epoch(region: PmemRegion) -> int | str:
    try:
        return layout.read_loss_epoch(region)
    except LayoutError as exc:
        return f"damaged: {exc}"


def _atomic_info(region: PmemRegion, header: layout.Header) -> dict[str, object]:
    atomic = layout.read_atomic_info(region, header)
    if atomic is None:
        return {"atomic_blocks": False}
    return {"atomic_blocks": True, "sector_size": atomic.sector_size,
            "sectors": atomic.external_blocks, "lanes": atomic.lanes,
            "export_size": atomic.export_size}


def cmd_info(args: argparse.Namespace) -> None:
    from . import durability

    info = region_info(args.path)
    is_pmem, method = bool(info["is_pmem"]), str(info["persistence"])
    memory = region_kind(os.stat(args.path), is_pmem)
    flush = {g.method: g.describe()
             for g in durability.guarantees(is_pmem, method, False, memory=memory)}
    if is_pmem and memory.persistent:
        flush["apm"] += "; with serve --apm-durable: persistent"
    info["flush"] = flush
    info["native_flush"] = durability.native_flush_support()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key in ("region_size", "data_size", "export_size"):
            assert isinstance(value, int)
            value = f"{value} ({human(value)})"
        if isinstance(value, dict):
            for sub, text in value.items():
                print(f"{'flush ' + sub + ':':<16}{text}")
            continue
        print(f"{key + ':':<16}{value}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .servers import parse_names
    from .service import serve
    from .session import ServeConfig

    transports = parse_names(args.transport)
    listen = parse_address(args.listen, "--listen")
    if isinstance(listen, UnixAddress) and "verbs" in transports:
        raise ConfigError("a unix: socket can only serve --transport tcp")
    for name in ("max_clients", "max_channels", "max_handshakes", "max_threads"):
        if not 1 <= getattr(args, name) <= MAX_CONNECTIONS:
            raise ConfigError(f"--{name.replace('_', '-')} must be from 1 to {MAX_CONNECTIONS}")
    if not 0 < args.handshake_timeout <= 3600:
        raise ConfigError("--handshake-timeout must be more than 0 and at most 3600 seconds")
    if not 1 <= args.keepalive <= 3600:
        raise ConfigError("--keepalive must be from 1 to 3600 seconds")
    tls = check_tls(args, transports)
    secret = load_secret(args.secret_file) if args.secret_file else None
    # A fault (SIGBUS if another program truncates the region under the target) then leaves
    # a line and a Python traceback in the log instead of a silent death.
    faulthandler.enable()
    serve(ServeConfig(path=args.path, listen=listen, transports=transports,
                      readonly=args.readonly, max_clients=args.max_clients,
                      max_channels=args.max_channels, max_threads=args.max_threads,
                      pid_file=args.pid_file, handshake_timeout=args.handshake_timeout,
                      max_handshakes=args.max_handshakes, keepalive=args.keepalive,
                      apm_durable=args.apm_durable, shared=args.shared,
                      durable_image=args.testing_durable_image, secret=secret,
                      clients_file=args.clients,
                      insecure_no_auth=args.insecure_no_auth,
                      fail_persist=args.testing_fail_persist,
                      lose_reply=args.testing_lose_reply, control=args.control,
                      tls=tls, tls_certificates=args.tls_certificates,
                      tls_verify_peer=args.tls_verify_peer))


def check_tls(args: argparse.Namespace, transports: tuple[str, ...]) -> str:
    """serve's TLS mode, checked against its other options."""
    from .tls import parse_mode

    mode = parse_mode(args.tls, "--tls ")
    if mode == "off" and (args.tls_certificates or args.tls_verify_peer):
        raise ConfigError("--tls-certificates and --tls-verify-peer need --tls on or require")
    if mode == "require" and "verbs" in transports:
        raise ConfigError("--tls require cannot serve --transport verbs: RDMA moves data "
                          "one-sided, NIC to memory, where the host cannot encrypt it (see "
                          "docs/security.md: IPsec or MACsec offload on the NIC); serve "
                          "--transport tcp")
    if mode != "off":  # the certificates, before the region is opened: one line if unusable
        from .servers.stream import server_tls

        server_tls(mode, args.tls_certificates, args.tls_verify_peer)
    if mode == "on" and "verbs" in transports:
        log.warning("--tls on: TCP clients may use TLS; RDMA (verbs) traffic is never "
                    "encrypted by the host (docs/security.md)")
    return mode


def cmd_tls_certificates(args: argparse.Namespace) -> None:
    from .tls import make_certificates

    for path in make_certificates(args.folder, server=args.server, client=args.client,
                                  days=args.days):
        print(f"wrote {path}")


def cmd_reload(args: argparse.Namespace) -> None:
    from .control import ask

    answer = ask(args.target, "reload").decode("utf-8", "replace").strip()
    if not answer.startswith("ok: "):
        raise ServiceError(f"{args.target}: {answer.removeprefix('error: ')}")
    print(answer.removeprefix("ok: "))


def cmd_secret(args: argparse.Namespace) -> None:
    create_secret(args.path)
    print(f"wrote a new secret to {args.path} (mode 600): give it to the target "
          f"(--secret-file {args.path}) and to its clients (secret-file={args.path})")


def cmd_attach(args: argparse.Namespace) -> None:
    from .attach import AttachOptions, attach

    att = attach(AttachOptions(
        target=args.target, device=args.device, no_device=args.no_device,
        secret_file=args.secret_file, client=args.client, flush=args.flush,
        transport=args.transport,
        readonly=args.readonly, connections=args.connections, name=args.name,
        **({"threads": args.threads} if args.threads is not None else {}),
        reconnect_timeout=args.reconnect_timeout,
        allow_visibility_only=args.allow_visibility_only, tls=args.tls,
        tls_certificates=args.tls_certificates))
    print(att.device or att.uri)


def cmd_detach(args: argparse.Namespace) -> None:
    from .attach import detach, detach_leftover
    from .attachments import find, leftovers

    left = next((lo for lo in leftovers() if lo.name == args.what), None)
    if left is not None:
        for warning in detach_leftover(left, force=args.force):
            print(f"pmemblk: warning: {warning}", file=sys.stderr)
        print(f"detached broken attachment {left.name} ({left.why})")
        return
    att = find(args.what)
    for warning in detach(att, force=args.force):
        print(f"pmemblk: warning: {warning}", file=sys.stderr)
    print(f"detached {att.name} ({att.device or att.uri})")


def cmd_list(args: argparse.Namespace) -> None:
    from .attach import live_status
    from .attachments import scan

    atts, lefts = scan()
    rows = [live_status(att) for att in atts]
    rows += [{"name": lo.name, "device": None, "target": "?", "folder": str(lo.folder),
              "state": f"broken: {lo.why} ({lo.folder}; pmemblk detach {lo.name})"}
             for lo in lefts]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("nothing attached")
        return
    print(f"{'NAME':<12} {'DEVICE':<11} {'TARGET':<24} {'TRANSPORT':<9} {'FLUSH':<12} STATE")
    for r in rows:
        flush = r.get("flush", "-") + ("" if r.get("persistent", True) else "(vis)")
        print(f"{r['name']:<12} {r['device'] or 'socket':<11} {r['target']:<24} "
              f"{r.get('transport', '-'):<9} {flush:<12} {r['state']}")


def cmd_status(args: argparse.Namespace) -> None:
    from . import control, status

    if args.watch:
        _watch_status(args)
        return
    if args.count is not None:
        raise ConfigError("--count goes with --watch")
    if args.target is not None:
        if args.what is not None:
            raise ConfigError("give a device or name, or --target SOCKET, not both")
        socket_path = args.target
        answer = (control.ask_metrics(socket_path) if args.prometheus or args.textfile
                  else None)
        values = [control.ask_status(socket_path)] if answer is None else []
    else:
        from .attach import live_status
        from .attachments import attachments, find

        atts = [find(args.what)] if args.what is not None else attachments()
        if not atts:
            raise ConfigError("nothing is attached (pmemblk attach TARGET); for a target, "
                              "pmemblk status --target SOCKET")
        values = [live_status(a) for a in atts]
        answer = None
        if args.prometheus or args.textfile:
            answer = b"".join(control.ask_metrics(str(a.control_socket)) for a in atts
                              if a.nbdkit_pid() is not None)
    if answer is not None:
        if args.textfile:
            status.write_textfile(args.textfile, answer)
        else:
            sys.stdout.write(answer.decode())
        return
    if args.json:
        print(json.dumps(values[0] if len(values) == 1 else values, indent=2))
        return
    for i, value in enumerate(values):
        if i:
            print()
        print(status.render(value, args.target))


def _watch_status(args: argparse.Namespace) -> None:
    from . import control, watch

    if args.json or args.prometheus or args.textfile:
        raise ConfigError("--watch shows the table: not with --json, --prometheus or --textfile")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    ask: Callable[[], dict[str, object]]
    if args.target is not None:
        if args.what is not None:
            raise ConfigError("give a device or name, or --target SOCKET, not both")
        socket_path = args.target
        what = f"the target at {socket_path}"
        ask = lambda: control.ask_status(socket_path)  # noqa: E731
    else:
        from .attach import live_status
        from .attachments import attachments, find

        atts = [find(args.what)] if args.what is not None else attachments()
        if len(atts) != 1:
            raise ConfigError("--watch shows one device: name it (pmemblk list)" if atts else
                              "nothing is attached (pmemblk attach TARGET)")
        att = atts[0]
        what = att.name
        ask = lambda: live_status(att)  # noqa: E731
    closing = watch.watch(ask, what, args.count)
    print(f"pmemblk: {closing}", file=sys.stderr)


def cmd_install_plugin(args: argparse.Namespace) -> None:
    from .install import check_mandir, install_man_pages, install_plugin

    check_mandir(args.mandir)  # a bad --mandir is refused before the plugin is written
    path = install_plugin(args.plugindir)
    print(f"installed {path}: nbdkit pmemblk target=... now works")
    for page in install_man_pages(args.mandir):
        print(f"installed {page}")


def cmd_install_units(args: argparse.Namespace) -> None:
    from .install import install_units

    for path in install_units(args.unit_dir):
        print(f"installed {path}")


def cmd_power_cut(args: argparse.Namespace) -> None:
    from .powercut import power_cut

    cut = power_cut(args.path, args.durable_image, args.keep, args.seed)
    print(f"power cut: {cut.unpersisted_words} unpersisted 8-byte words, {cut.kept_words} "
          f"kept, {cut.lost_words} reverted to their durable value")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmemblk", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"pmemblk {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--debug", action="store_true", help="debug log and tracebacks on errors")
    p.add_argument("--run-dir", metavar="DIR", help="where attach keeps its state (default "
                   "/run/pmemblk, or $PMEMBLK_RUN_DIR)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="write a new region header (file or devdax)")
    c.add_argument("path")
    c.add_argument("--size", help="region size for a new file, e.g. 1G (binary units)")
    c.add_argument("--block-size", type=int, default=layout.DEFAULT_BLOCK_SIZE,
                   help="block size advertised to clients (default 4096)")
    c.add_argument("--force", action="store_true", help="erase an existing file or region")
    c.add_argument("--atomic-blocks", action="store_true",
                   help="lay out atomic blocks: a power cut never leaves a block half written "
                   "(docs/persistence.md); --block-size 512 or 4096")
    c.add_argument("--lanes", type=int,
                   help="with --atomic-blocks: free blocks for writes in flight, "
                   f"{atomicblocks.LANES_PER_WRITER} per writer (default "
                   f"{atomicblocks.DEFAULT_LANES})")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("info", help="show a region's header and state")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="export a region over RDMA and/or TCP")
    s.add_argument("path")
    s.add_argument("--listen", required=True, metavar="ADDR:PORT|unix:PATH",
                   help="for verbs, the address of the RDMA interface and a port, e.g. "
                   "192.0.2.1:7000; for tcp also a loopback address or unix:PATH")
    s.add_argument("--transport", default="verbs", metavar="verbs|tcp|verbs,tcp",
                   help="how clients reach the region (default verbs); both may share a port")
    s.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="tcp: drop a client that sends no HELLO within this time (default 10)")
    s.add_argument("--apm-durable", action="store_true",
                   help="assert that this platform puts incoming writes in the persistence "
                   "domain (ADR with DDIO off, or eADR), making flush=apm persistent on pmem")
    s.add_argument("--testing-durable-image", metavar="PATH",
                   help="TESTING ONLY: power-cut emulation; see pmemblk testing-power-cut")
    s.add_argument("--testing-fail-persist", metavar="SPEC",
                   help="TESTING ONLY: make persistence fail (errno=EIO|ENOSPC, after=N, "
                   "times=N, range=OFF:LEN; see docs/testing.md)")
    s.add_argument("--testing-lose-reply", metavar="commit:N|read:N|write:N",
                   help="TESTING ONLY: never send the N-th COMMIT (or READ, or WRITE) reply "
                   "and drop that client")
    s.set_defaults(func=cmd_serve)

    pc = sub.add_parser("testing-power-cut",
                        help="TESTING ONLY: make the region what a power cut would leave")
    pc.add_argument("path")
    pc.add_argument("--durable-image", required=True, metavar="PATH",
                    help="the image the target kept with --testing-durable-image")
    pc.add_argument("--keep", type=float, default=0.0, metavar="FRACTION",
                    help="share of unpersisted 8-byte words that survive anyway (default 0)")
    pc.add_argument("--seed", type=int, default=0)
    pc.set_defaults(func=cmd_power_cut)
    s.add_argument("--readonly", action="store_true", help="clients may only read")
    s.add_argument("--shared", action="store_true",
                   help="allow several read-write clients at once (default: one); they must "
                   "coordinate their writes, e.g. a cluster filesystem")
    s.add_argument("--secret-file", metavar="PATH",
                   help="clients must prove they hold this shared secret (make one with "
                   "pmemblk secret PATH); required to listen on a non-loopback address")
    s.add_argument("--clients", metavar="FILE",
                   help="a clients file: one line per identity, NAME rw|ro SECRET_FILE; "
                   "re-read on SIGHUP and by pmemblk reload (instead of --secret-file)")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="listen on a non-loopback address without a secret: anyone who can "
                   "connect can read and write the region")
    s.add_argument("--max-clients", type=int, default=64,
                   help="authenticated clients at once (default 64)")
    s.add_argument("--max-channels", type=int, default=64, metavar="N",
                   help="connections one client may have open at once: the plugin opens one "
                   "per nbdkit worker thread and NBD connection (default 64)")
    s.add_argument("--max-threads", type=int, default=512, metavar="N",
                   help="TCP and unix: connections served at once over every client, each by "
                   "a thread of its own; more are refused, to be tried again (default 512)")
    s.add_argument("--max-handshakes", type=int, default=64, metavar="N",
                   help="connections not yet authenticated at once; more are refused with "
                   "EBUSY (default 64)")
    s.add_argument("--keepalive", type=float, default=15.0, metavar="SECONDS",
                   help="tcp: a client silent this long is probed; one whose host is gone is "
                   "dropped after about twice this (default 15)")
    s.add_argument("--pid-file", help="write the PID here once listening; removed on exit")

    s.add_argument("--control", metavar="PATH",
                   help="answer pmemblk status --target PATH on this Unix socket (mode 600)")
    s.add_argument("--tls", default="off", metavar="off|on|require",
                   help="tcp: TLS 1.3 (default off); on: clients may use it, require: they "
                   "must (docs/security.md)")
    s.add_argument("--tls-certificates", metavar="DIR",
                   help="server-cert.pem, server-key.pem (and ca-cert.pem for "
                   "--tls-verify-peer); make them with pmemblk tls-certificates")
    s.add_argument("--tls-verify-peer", action="store_true",
                   help="clients must present a certificate signed by DIR/ca-cert.pem")

    tc = sub.add_parser("tls-certificates", help="make a CA (once) and a server or client "
                        "certificate signed by it, for TLS (files mode 600, never overwritten)")
    tc.add_argument("folder", metavar="DIR")
    who = tc.add_mutually_exclusive_group(required=True)
    who.add_argument("--server", metavar="NAME", action="append",
                     help="the host name or IP address clients connect to (repeat for more)")
    who.add_argument("--client", metavar="NAME", help="a client certificate's name")
    tc.add_argument("--days", type=int, default=825, help="validity (default 825)")
    tc.set_defaults(func=cmd_tls_certificates)

    rl = sub.add_parser("reload", help="make a running target re-read its --clients file "
                        "(as SIGHUP does): removed identities are dropped at once")
    rl.add_argument("--target", metavar="SOCKET", required=True,
                    help="the target's --control socket")
    rl.set_defaults(func=cmd_reload)

    k = sub.add_parser("secret", help="write a new random shared secret to a file (mode 600)")
    k.add_argument("path")
    k.set_defaults(func=cmd_secret)

    a = sub.add_parser("attach", help="connect a target as /dev/nbdN (nbdkit and nbd-client "
                       "in the background)")
    a.add_argument("target", metavar="HOST:PORT|unix:PATH")
    a.add_argument("--device", metavar="/dev/nbdN", help="default: the first free one")
    a.add_argument("--no-device", action="store_true",
                   help="no kernel device: serve the NBD socket only and print its URI "
                   "(for libnbd, qemu, fio's nbd engine)")
    a.add_argument("--secret-file", metavar="PATH", help="the target's shared secret")
    a.add_argument("--client", metavar="NAME",
                   help="the identity to connect as (a line of the target's --clients file)")
    a.add_argument("--flush", default="auto", choices=("auto", "native", "gpspm", "apm"))
    a.add_argument("--transport", default="auto", choices=("auto", "verbs", "tcp"))
    a.add_argument("--readonly", action="store_true")
    a.add_argument("--connections", type=int, default=1, metavar="N",
                   help="NBD connections, one client of the target (default 1)")
    a.add_argument("--threads", type=int, metavar="N",
                   help="nbdkit worker threads per connection (default: 8 shared by the "
                   "connections; see docs/benchmarks.md)")
    a.add_argument("--name", help="what detach and status call it (default: the device's "
                   "name, e.g. nbd0)")
    a.add_argument("--reconnect-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long requests wait for a lost target to come back (default 60)")
    a.add_argument("--allow-visibility-only", action="store_true",
                   help="accept a flush method that is not persistent on this target")
    a.add_argument("--tls", default="off", choices=("off", "on", "require"),
                   help="TLS 1.3 over TCP (default off); require refuses a target without it")
    a.add_argument("--tls-certificates", metavar="DIR",
                   help="ca-cert.pem (and client-cert.pem, client-key.pem) for --tls")
    a.set_defaults(func=cmd_attach)

    d = sub.add_parser("detach", help="flush, disconnect and stop what attach started")
    d.add_argument("what", metavar="DEVICE|NAME")
    d.add_argument("--force", action="store_true",
                   help="detach even if the final flush fails")
    d.set_defaults(func=cmd_detach)

    ls = sub.add_parser("list", help="attached devices")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    st = sub.add_parser("status", help="what a device (or, with --target, a target) is doing")
    st.add_argument("what", nargs="?", metavar="DEVICE|NAME", help="default: every attachment")
    st.add_argument("--target", metavar="SOCKET",
                    help="ask the target serving with --control SOCKET instead")
    st.add_argument("--json", action="store_true")
    st.add_argument("--prometheus", action="store_true",
                    help="print the Prometheus text format")
    st.add_argument("--textfile", metavar="PATH",
                    help="write the Prometheus text format to PATH atomically (for "
                    "node_exporter's textfile collector)")
    st.add_argument("--watch", action="store_true",
                    help="refresh every second (ops/s, MB/s, p99 per operation, reconnects) "
                    "until Ctrl-C or the device goes")
    st.add_argument("--count", type=int, metavar="N",
                    help="with --watch: stop after N refreshes")
    st.set_defaults(func=cmd_status)

    ip = sub.add_parser("install-plugin", help="install the plugin where nbdkit finds it, so "
                        "that nbdkit pmemblk target=... works")
    ip.add_argument("--plugindir", help="default: nbdkit's own (nbdkit --dump-config)")
    ip.add_argument("--mandir", default="/usr/local/share/man", metavar="DIR",
                    help="install the man pages pmemblk(8) and nbdkit-pmemblk-plugin(1) "
                    "under DIR/man8 and DIR/man1 (default /usr/local/share/man)")
    ip.set_defaults(func=cmd_install_plugin)

    iu = sub.add_parser("install-units", help="install the systemd units "
                        "pmemblk-serve@.service and pmemblk-attach@.service")
    iu.add_argument("--unit-dir", default="/etc/systemd/system")
    iu.set_defaults(func=cmd_install_units)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        # Bash asking for completions (share/bash-completion/completions/pmemblk): argcomplete
        # answers from this parser and exits.
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose or args.debug else (
        logging.INFO if args.command == "serve" else logging.WARNING)
    # pyverbs logs every object it creates (one logger per class): keep -v to pmemblk's own.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="pmemblk[%(process)d]: %(levelname)s: %(message)s")
    log.setLevel(level)
    if args.run_dir:
        os.environ["PMEMBLK_RUN_DIR"] = args.run_dir
    try:
        args.func(args)
    except PmemblkError as exc:
        if args.debug:
            raise
        print(f"pmemblk: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
