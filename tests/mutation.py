"""A mutation score for the code that guards data: small, realistic bugs planted one at a time
in a copy of the tree, each run against the fast host tests that should catch it.

    scripts/mutants [--list] [NAME ...]

A mutant is *killed* when its tests fail, *survives* when they pass; one that no host test can
tell from the real code carries the reason (an *equivalent* mutant) and is reported apart.
Every mutant's replacement must match its file exactly once, so a mutant that no longer fits
the code is reported as stale instead of silently passing. The latest score is in
docs/testing.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAULTS = "tests/integration/test_faults.py"
WIRE = "tests/integration/test_wire.py"
HOSTILE = "tests/integration/test_hostile.py"
RECONNECT = "tests/integration/test_reconnect.py"
AUTH = "tests/integration/test_auth.py"
DAYTWO = "tests/integration/test_daytwo.py"
MULTICONN = "tests/integration/test_multiconn.py"
CLIENT = "tests/test_client.py"
ATOMIC = "tests/test_atomicblocks.py"
TORN = "tests/crash/test_torn.py"
ATOMIC_IT = "tests/integration/test_atomic.py"
BARRIERS = "tests/test_client_barriers.py"
FUA_FRAMES = "tests/integration/test_fua_frames.py"
CRASH = "tests/crash/test_crash.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    #: A pytest -k expression narrowing ``tests``, if any.
    select: str = ""
    #: Why no host test can tell this mutant from the real code, if none can.
    equivalent: str = ""


MUTANTS = (
    # -- target core (pmemblk/target.py)
    Mutant("COMMIT persists only its first range", "pmemblk/target.py",
           "for off, length in commit.ranges:", "for off, length in commit.ranges[:1]:",
           (FAULTS,)),
    Mutant("COMMIT logs a failed persist and replies success", "pmemblk/target.py",
           "                status = exc.errno", "                status = 0", (FAULTS,)),
    Mutant("WELCOME carries a stale loss epoch", "pmemblk/target.py",
           "commit_depth=COMMIT_DEPTH, durable_methods=durable,\n"
           "            loss_epoch=self.loss_epoch,",
           "commit_depth=COMMIT_DEPTH, durable_methods=durable,\n"
           "            loss_epoch=0,", (FAULTS,)),
    Mutant("a second read-write client is admitted", "pmemblk/target.py",
           "if (not readonly and self.writers and not self.config.shared",
           "if (False", (WIRE + "::test_one_writer_unless_shared",)),
    Mutant("a clean stop marks clean before it persists", "pmemblk/target.py",
           "                try:\n                    self.region.persist(self.header.data_offset, "
           "self.size)",
           "                layout.write_state(self.region, layout.State(True, 0))\n"
           "                try:\n                    self.region.persist(self.header.data_offset, "
           "self.size)", (FAULTS,)),
    Mutant("a clean stop does not persist the data area", "pmemblk/target.py",
           "                    self.region.persist(self.header.data_offset, self.size)\n",
           "                    pass\n", (FAULTS,)),
    Mutant("a clean stop never marks clean", "pmemblk/target.py",
           "                layout.write_state(self.region, layout.State(True, "
           "state.times_served))",
           "                pass", (FAULTS,)),
    Mutant("a target that failed to start marks the region clean", "pmemblk/target.py",
           "if self.began and not self.readonly:", "if not self.readonly:", (HOSTILE,)),
    Mutant("serve takes no region lock", "pmemblk/target.py",
           'stack.enter_context(RegionLock(config.path, "serve it", shared=config.readonly))',
           "pass", (HOSTILE + "::test_a_second_serve_create_or_power_cut_is_refused_and_a_flush"
                    "_of_lost_writes_fails",)),
    Mutant("no cap on connections in their handshake", "pmemblk/target.py",
           "if self.handshakes >= self.config.max_handshakes:", "if False:",
           (HOSTILE + "::test_connections_in_their_handshake_are_capped",)),
    # -- client core (pmemblk/client.py, pmemblk/flush.py)
    Mutant("a failed COMMIT drops its dirty ranges", "pmemblk/flush.py",
           "                for off, n in ranges:  # not persisted: a later flush must try them "
           "again\n                    self._dirty.add(off, n)",
           "                pass", (FAULTS,)),
    Mutant("a failed FUA write is not retried by the next flush", "pmemblk/client.py",
           "                        self._wrote(ch, offset, length, True, proven=False)",
           "                        pass", (FAULTS,)),
    Mutant("FUA ignored on zero", "pmemblk/client.py",
           "t.write_zeroes(offset, length, step), offset,\n"
           "                                length, fua)",
           "t.write_zeroes(offset, length, step), offset,\n"
           "                                length, False)", (FAULTS,)),
    Mutant("the loss epoch is checked against the dirty ranges", "pmemblk/client.py",
           "                if self._writes > self._flushed and self.lost is None:",
           "                if self.policy.__dict__.get('_dirty') and self.lost is None:",
           (FAULTS,)),
    Mutant("a reconnect to another region is accepted", "pmemblk/client.py",
           "if new.region_uuid != old.region_uuid:", "if False:",
           (RECONNECT + "::test_a_target_now_serving_another_region_is_refused",)),
    Mutant("a request that keeps failing is retried for ever", "pmemblk/client.py",
           "                elif now >= deadline:", "                elif False:",
           (FAULTS + "::test_a_request_that_keeps_losing_its_connection_gives_up_in_time",)),
    Mutant("the client's bounds check is off by one", "pmemblk/client.py",
           "if offset < 0 or length < 0 or offset + length > self.size:",
           "if offset < 0 or length < 0 or offset + length > self.size + 1:", (FAULTS,)),
    Mutant("the client lets a read-only connection write", "pmemblk/client.py",
           "        if self.readonly:\n            raise RequestError", "        if False:\n"
           "            raise RequestError", (FAULTS,)),
    Mutant("apm flush skips its READ barriers", "pmemblk/flush.py",
           "        barriers(True)", "        pass",
           (CLIENT + "::test_a_flush_orders_the_writes_of_every_channel",)),
    # -- channels and multi-conn (issue 12)
    Mutant("a flush puts a barrier on its own channel only", "pmemblk/client.py",
           "c.wrote_at is not None and (with_own or c is not own)]",
           "c.wrote_at is not None and c is own and with_own]",
           (CLIENT + "::test_a_flush_orders_the_writes_of_every_channel",)),
    Mutant("each NBD connection is a client of its own", "pmemblk/nbdplugin.py",
           "if client is not None and client.broken is None and client.lost is None:",
           "if False:", (MULTICONN + "::test_writes_on_three_connections_a_flush_on_a_fourth"
                         "_survive_a_power_cut",)),
    Mutant("every thread that lost the target looks for it", "pmemblk/client.py",
           "first = self._generation == seen", "first = True",
           (MULTICONN + "::test_a_lost_target_is_noticed_once",)),
    Mutant("unflushed means unflushed on this channel", "pmemblk/client.py",
           "if self._writes > self._flushed and self.lost is None:",
           "if ch.wrote_at is not None and self.lost is None:",
           (MULTICONN + "::test_a_power_cut_seen_by_another_channel_fails_the_flush",)),
    Mutant("a client's second read-write channel is refused", "pmemblk/target.py",
           "and (session is None or not session.writers)):", "):",
           (MULTICONN + "::test_one_client_many_channels_one_writer",)),
    Mutant("a client's channels are not bounded", "pmemblk/target.py",
           "if session is not None and session.channels >= self.config.max_channels:",
           "if False:", (MULTICONN + "::test_channels_past_the_targets_limit_are_not_needed",)),
    # -- transports' shared checks (pmemblk/transport/__init__.py)
    Mutant("a COMMIT_REPLY's error status is ignored", "pmemblk/transport/__init__.py",
           "    if reply.status:", "    if False:", (FAULTS,)),
    # -- layout, protocol, auth
    Mutant("the header CRC is not checked", "pmemblk/layout.py", "if crc != actual:",
           "if False:", ("tests/test_layout.py",)),
    Mutant("the loss epoch never increments", "pmemblk/layout.py",
           "epoch = read_loss_epoch(region) + (not continuity)",
           "epoch = read_loss_epoch(region)", ("tests/test_layout.py",)),
    Mutant("the target's bounds check is off by one", "pmemblk/protocol.py",
           "        if offset + length > export_size:",
           "        if offset + length > export_size + 1:", ("tests/test_protocol.py", WIRE)),
    Mutant("a COMMIT range past the end is accepted", "pmemblk/protocol.py",
           "if length == 0 or off + length > export_size:", "if length == 0:",
           ("tests/test_protocol.py", WIRE)),
    Mutant("the client's MAC is compared over 0 bytes", "pmemblk/auth.py",
           "return hmac.compare_digest(auth.mac, client_mac(secret, hello, challenge))",
           "return hmac.compare_digest(auth.mac[:0], client_mac(secret, hello, challenge)[:0])",
           (AUTH,)),
    Mutant("the target's proof is not checked", "pmemblk/auth.py",
           "            if not hmac.compare_digest(welcome.proof, expected):",
           "            if False:", (AUTH,)),
    # -- the stream server's limits (pmemblk/servers/stream.py)
    Mutant("the target applies a read-only client's write", "pmemblk/servers/channel.py",
           "        elif self.readonly:  # the export, or this client's own read-only mode",
           "        elif False:", (WIRE + "::test_one_writer_unless_shared",)),
    Mutant("the handshake deadline is cancelled at HELLO", "pmemblk/servers/stream.py",
           "        self.greeting = greeting\n",
           "        self.greeting = greeting\n        if self.timer is not None:\n"
           "            self.server.reactor.cancel(self.timer)\n            self.timer = None\n",
           (FAULTS,)),
    Mutant("a live socket at the listen path is taken over",
           "pmemblk/unixsock.py",
           "        raise ConfigError(f\"{what}: another process is listening",
           "        pass\n        if False: raise ConfigError(f\"{what}: another "
           "process is listening", (HOSTILE + "::test_listen_refuses_to_delete_what_is_not_a"
                                    "_stale_socket",)),
    Mutant("a target removes a socket that is no longer its own",
           "pmemblk/unixsock.py",
           "if (st.st_dev, st.st_ino) == ident:", "if True:",
           (HOSTILE + "::test_a_stale_socket_is_replaced_and_a_target_removes_only_its_own",)),
    Mutant("accept failures are retried at once", "pmemblk/servers/stream.py",
           "                self._pause_accepting(exc)\n                return",
           "                log.warning(\"accept failed: %s\", exc)\n                return",
           (HOSTILE + "::test_out_of_descriptors_the_target_backs_off_and_recovers",)),
    Mutant("no TCP keepalive", "pmemblk/servers/stream.py",
           "                set_keepalive(sock, self.export.config.keepalive)", "",
           (HOSTILE + "::test_a_vanished_client_host_gives_back_the_writer_slot",)),
    # -- power-cut emulation, provisioning
    Mutant("create leaves the file sparse", "pmemblk/provision.py",
           "            allocate(lock.fd, path, size, progress)\n            return _format(path, "
           "block_size, lanes)\n    except",
           "            return _format(path, block_size, lanes)\n    except",
           (HOSTILE + "::test_create_on_a_full_filesystem_fails_in_one_line_and_leaves_nothing",)),
    # -- day two: attach, status (issue 13)
    Mutant("a failed attach leaves its directory behind", "pmemblk/attach.py",
           "        undo.callback(_remove_folder, folder)\n", "",
           (DAYTWO + "::test_an_attach_whose_nbdkit_cannot_start_leaves_nothing",)),
    Mutant("control sockets are made with the caller's umask", "pmemblk/unixsock.py",
           "    old = os.umask(0o177)", "    old = os.umask(0o022)",
           (DAYTWO + "::test_prometheus_text_from_device_and_target",)),
    Mutant("the bytes of failed requests are counted", "pmemblk/stats.py",
           "            s.bytes += nbytes if ok else 0", "            s.bytes += nbytes",
           ("tests/test_stats.py",)),
    Mutant("detach takes any PID in the pid file for nbdkit", "pmemblk/attach.py",
           "        return pid if str(self.nbd_socket).encode() in cmdline.split(b\"\\0\") "
           "else None", "        return pid",
           (DAYTWO + "::test_detach_after_nbdkit_died",)),
    # -- atomic blocks (pmemblk/atomicblocks.py, the target's lanes)
    Mutant("atomic blocks reuse a freed block before its map move is persistent",
           "pmemblk/atomicblocks.py",
           "                persist(t, [(info.map_at(lbas[i]), ENTRY) for i in moved])",
           "                pass", (TORN,), select="never_torn"),
    Mutant("atomic blocks move the map before the data and record are persistent",
           "pmemblk/atomicblocks.py", "                         + records, step)",
           "                         + records, None)", (TORN,), select="never_torn"),
    Mutant("recovery takes an overtaken move named in another lane's record as not done",
           "pmemblk/atomicblocks.py",
           "            happened = named or _in_map(area, info, new_b)",
           "            happened = _in_map(area, info, new_b)", (ATOMIC,)),
    Mutant("recovery never searches the map", "pmemblk/atomicblocks.py",
           "            happened = named or _in_map(area, info, new_b)",
           "            happened = named", (ATOMIC,)),
    Mutant("recovery frees the new block of a finished move", "pmemblk/atomicblocks.py",
           "        frees.append(old_b if happened else new_b)", "        frees.append(new_b)",
           (ATOMIC,)),
    Mutant("a lane cut short mid-move is reused without asking the map",
           "pmemblk/atomicblocks.py",
           "                    if lane.pending is None or self._resolve(t, lane, persist):",
           "                    if True:", (CLIENT,), select="cut_short"),
    Mutant("a move that loses the race to another writer is dropped",
           "pmemblk/atomicblocks.py",
           "            again = [i for i in range(n) if found[i] != olds[i]]",
           "            again: list[int] = []", (CLIENT,), select="loses_the_race"),
    Mutant("a read does not check that its blocks did not move under it",
           "pmemblk/atomicblocks.py",
           "            todo = [i for i in todo if again[i] != entries[i]]",
           "            todo = []", (CLIENT,), select="moved_under"),
    Mutant("a writer's lanes are not given back when it leaves", "pmemblk/target.py",
           "            self._lane_owner.pop(group, None)", "            pass",
           (ATOMIC_IT,), select="lanes_run_out"),
    Mutant("two writers get the same lanes", "pmemblk/target.py",
           "            if group not in self._lane_owner and group not in self._quarantined:",
           "            if group not in self._quarantined:", (ATOMIC_IT,),
           select="lanes_run_out"),
    # -- issue 23: barriers that fail, what a flush covers, multi-frame FUA through a power cut
    Mutant("a barrier that fails when waited for still clears its channel", "pmemblk/client.py",
           "                ch.transport.finish_barrier()\n                ch.wrote_at = None",
           "                ch.wrote_at = None\n                ch.transport.finish_barrier()",
           (BARRIERS,), select="failed_barrier and finish"),
    Mutant("a failed barrier is not tried again on its channel", "pmemblk/client.py",
           "            if at is not None:  # its connection failed: order it on a new one",
           "            if False:", (BARRIERS,), select="failed_barrier and start"),
    Mutant("a barrier whose retry fails is forgotten", "pmemblk/client.py",
           "                self._run(ch, lambda t: t.read_barrier(at))  # noqa: B023 (run at "
           "once)\n                ch.wrote_at = None",
           "                ch.wrote_at = None\n"
           "                self._run(ch, lambda t: t.read_barrier(at))  # noqa: B023 (run at "
           "once)",
           (BARRIERS,), select="failed_barrier"),
    Mutant("a failed barrier is tried again on its broken connection", "pmemblk/client.py",
           "                self._run(ch, lambda t: t.read_barrier(at))  # noqa: B023 (run at "
           "once)",
           "                ch.transport.read_barrier(at)  # type: ignore[union-attr]",
           (BARRIERS,), select="connection_breaks"),
    Mutant("a failed COMMIT still counts as ordering its channel", "pmemblk/client.py",
           "            self._run(own, lambda t: t.commit(ranges))\n"
           "        own.wrote_at = None",
           "            own.wrote_at = None\n"
           "            self._run(own, lambda t: t.commit(ranges))",
           (BARRIERS,), select="failed_commit"),
    Mutant("gpspm commits before it orders the other channels", "pmemblk/flush.py",
           "            barriers(False)  # the COMMIT itself orders the flushing channel's writes\n"
           "            commit(ranges)",
           "            commit(ranges)\n"
           "            barriers(False)", (BARRIERS,), select="failed_barrier and gpspm"),
    Mutant("a flush takes its ranges once it holds the channels", "pmemblk/client.py",
           "                    ranges = self.policy.take()\n"
           "                with contextlib.ExitStack() as held:  # in one order: no ring of "
           "waiters\n"
           "                    for ch in sorted(chans, key=lambda c: c.number):\n"
           "                        held.enter_context(ch.lock)\n",
           "                with contextlib.ExitStack() as held:  # in one order: no ring of "
           "waiters\n"
           "                    for ch in sorted(chans, key=lambda c: c.number):\n"
           "                        held.enter_context(ch.lock)\n"
           "                    ranges = self.policy.take()\n",
           (BARRIERS,), select="during_a_flush_is_persisted"),
    Mutant("a flush counts the writes that completed while it ran", "pmemblk/client.py",
           "            self._flushed = max(self._flushed, covered)",
           "            self._flushed = max(self._flushed, self._writes)",
           (BARRIERS,), select="during_a_flush_is_still_unflushed"),
    Mutant("a FUA write whose step failed needs no barrier", "pmemblk/client.py",
           "            if not proven or (ch.transport is not None and not "
           "ch.transport.placed_on_reply):",
           "            if proven and ch.transport is not None and not "
           "ch.transport.placed_on_reply:",
           (BARRIERS,), select="failed_fua"),
    Mutant("a flush that met a new loss epoch while it reconnected is acknowledged",
           "pmemblk/client.py",
           "        if self.lost is not None:  # found out while reconnecting during this flush\n"
           "            raise RemoteError(self.lost, errno.EIO)",
           "        pass", (BARRIERS,), select="lost_power"),
    Mutant("a multi-frame FUA write's COMMIT covers only its first frame",
           "pmemblk/transport/stream.py",
           "self._send(Commit(commit_id, ((offset, length),)).encode())",
           "self._send(Commit(commit_id, ((offset, min(length, step)),)).encode())",
           (FUA_FRAMES,)),
    Mutant("a multi-frame FUA write's COMMIT covers only its first frame (crash suite)",
           "pmemblk/transport/stream.py",
           "self._send(Commit(commit_id, ((offset, length),)).encode())",
           "self._send(Commit(commit_id, ((offset, min(length, step)),)).encode())",
           (CRASH,), select="power-cut-gpspm and not stop"),
    Mutant("a FUA write of one frame takes the path without its COMMIT",
           "pmemblk/transport/stream.py",
           "        if length <= step and not commit:", "        if length <= step:",
           (FUA_FRAMES,), select="multi_frame_fua_write_survives"),
    Mutant("the plugin drops FUA on a write", "pmemblk/nbdkit_plugin.py",
           "    _guard(h.pwrite, memoryview(buf), offset, bool(flags & nbdkit.FLAG_FUA))",
           "    _guard(h.pwrite, memoryview(buf), offset, False)",
           (FUA_FRAMES,), select="through_nbdkit"),
)


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def pytest(tree: Path, tests: tuple[str, ...], select: str = "", timeout: float = 600,
           show_failure: bool = False) -> int:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests,
           *(["-k", select] if select else [])]
    try:
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 1  # a hang is a failure the mutant caused
    if show_failure and res.returncode != 0:
        print("\n".join(res.stdout.splitlines()[-40:]), file=sys.stderr)
    return res.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/mutants", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.path}: {m.name}")
        return 0
    killed: list[Mutant] = []
    survived: list[Mutant] = []
    stale: list[Mutant] = []
    equivalent: list[Mutant] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pmemblk-mutants.") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        selections = sorted({(m.tests, m.select) for m in chosen})
        print(f"baseline: the {len(selections)} test selections pass on the unmutated copy ...",
              flush=True)
        for tests, select in selections:
            if pytest(tree, tests, select, show_failure=True) != 0:  # 5: selects nothing
                print(f"{' '.join(tests)} fails without any mutant: fix that first",
                      file=sys.stderr)
                return 2
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                stale.append(m)
                print(f"STALE     {m.name}: its code is not in {m.path} exactly once", flush=True)
                continue
            target.write_text(original.replace(m.old, m.new))
            t0 = time.monotonic()
            rc = pytest(tree, m.tests, m.select)
            target.write_text(original)
            verdict = "killed" if rc == 1 else "SURVIVED" if rc == 0 else f"error {rc}"
            if rc == 1:
                killed.append(m)
            elif rc == 0 and m.equivalent:
                verdict = "equivalent"
                equivalent.append(m)
            else:
                survived.append(m)
            print(f"{verdict:<10} {m.name} ({m.path}, {time.monotonic() - t0:.0f}s)", flush=True)
            if verdict == "equivalent":
                print(f"           {m.equivalent}", flush=True)
    total = len(killed) + len(survived)
    print(f"\nmutation score: {len(killed)} of {total} killed, {len(survived)} survived "
          f"(plus {len(equivalent)} equivalent, explained), {len(stale)} stale, in "
          f"{time.monotonic() - started:.0f}s")
    return 0 if not survived and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
