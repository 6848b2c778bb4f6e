"""Power-cut emulation, for tests only: what survives is exactly what was persisted.

A *durable image* is a file beside the region that only persistence calls update: every
``PmemRegion.persist(offset, length)`` copies that range, widened to whole 64-byte cache lines
(the granularity ``pmem_persist`` works at), from the mapping into the image. The region file
itself stands for volatile memory.

A simulated power cut (``pmemblk testing-power-cut``, with the target stopped) rebuilds the
region from the image. Each 8-byte word that was written but never persisted is kept with
probability ``keep`` (write-back that happened to reach media before the cut) and otherwise
reverts to its durable value. Aligned 8-byte stores are the unit of power-fail atomicity, so a
word is never torn. The result becomes both the region and the new durable image, and the
region's boot id is cleared: after a power cut the machine boots again (pmemblk.layout).

A native FLUSH (the IBTA verb, ``flush=native``) never reaches the target's CPU, so no
``persist()`` call sees it. Where the target serves it, the emulation watches the kernel
instead (``NativeFlushTrace``): Soft-RoCE executes FLUSH_PERSISTENT in
``rxe_flush_pmem_iova(mr, iova, length)``; a kprobe on it, in a tracefs instance of its own,
reports each one, and a helper process the target starts copies the range into the image.
The helper outlives a SIGKILLed target; ``testing-power-cut`` stops it (SIGTERM: it drains
what the kernel buffered first) before it cuts, and applies what a helper that died left in
the buffer (``IMAGE.native`` says where).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files, layout
from .errors import PmemError
from .lock import RegionLock
from .pmem import PmemRegion, check_region_path

log = logging.getLogger(__name__)

LINE = 64
WORD = 8
BLOCK = 4096
CHUNK = 1 << 20


class DurableImage:
    """Keeps the durable image of a region up to date (attach with ``region.on_persist``)."""

    def __init__(self, path: str, region: PmemRegion) -> None:
        self.path = path
        self.region = region
        if region.size % LINE:
            raise PmemError(f"{region.path}: size is not a multiple of {LINE}")
        exists = os.path.exists(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (
                0 if exists else os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW), 0o600)
        except OSError as exc:
            raise PmemError(f"durable image {path}: {exc.strerror}") from None
        self._closed = False
        # Persists run on several channels' threads at once: an older copy of a range must
        # never land in the image after a newer one.
        self._lock = threading.Lock()
        if not exists:  # what is in the region now is the durable starting point
            self._copy_region()
        elif os.fstat(self.fd).st_size != region.size:
            os.close(self.fd)
            raise PmemError(f"durable image {path} is not the size of {region.path}")
        region.on_persist = self.on_persist
        log.warning("TESTING ONLY: power-cut emulation on; durable image %s", path)

    def _copy_region(self) -> None:
        """The whole region into the image just made; on failure (a full disk) the image
        is removed, so a later serve does not take a short one for a durable copy."""
        try:
            for off in range(0, self.region.size, CHUNK):
                data = memoryview(self.region.read(off, min(CHUNK, self.region.size - off)))
                done = 0
                while done < len(data):
                    done += os.pwrite(self.fd, data[done:], off + done)
        except OSError as exc:
            os.close(self.fd)
            os.unlink(self.path)
            raise PmemError(f"cannot write durable image {self.path}: {exc.strerror} "
                            "(nothing was left there)") from None

    def on_persist(self, offset: int, length: int) -> None:
        start = offset // LINE * LINE
        end = min(self.region.size, -(-(offset + length) // LINE) * LINE)
        with self._lock:  # and across processes (the native FLUSH tracer writes it too)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                os.pwrite(self.fd, self.region.read(start, end - start), start)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.region.on_persist = None
        os.close(self.fd)


TRACEFS = Path("/sys/kernel/tracing")
FLUSH_SYMBOL = "rxe_flush_pmem_iova"  # (struct rxe_mr *mr, u64 iova, unsigned int length)
_EVENT = re.compile(r"iova=(0x[0-9a-fA-F]+) len=(\d+)")


class NativeFlushTrace:
    """TESTING ONLY: feeds the durable image the native FLUSHes rxe executes on the region
    (see the module's docstring). Needs root, tracefs and kprobe events (the VM has them).

    It runs in a helper process of its own (``FlushTracer`` starts it), not in the target:
    an event read from ``trace_pipe`` has left the kernel's buffer, and a SIGKILLed target
    would lose the ones it had read and not yet copied. The helper is only ever stopped
    with SIGTERM (by the target's clean stop, or by ``power_cut``), after which it drains."""

    def __init__(self, image: DurableImage, base: int) -> None:
        self.image = image
        self.base = base  # the target's address of the region: iova - base = offset
        self.group = f"pmemblk_{os.getpid()}"
        self.instance = TRACEFS / "instances" / self.group
        self.flushes = 0
        try:
            _tracefs_write(TRACEFS / "kprobe_events",
                           f"p:{self.group}/flush {FLUSH_SYMBOL} iova=%si:x64 len=%dx:u32\n")
            self.instance.mkdir()
            _tracefs_write(self.instance / "events" / self.group / "flush" / "enable", "1")
        except OSError as exc:
            remove_trace(self.group, self.instance)
            raise PmemError(f"cannot trace native FLUSHes (kprobe on {FLUSH_SYMBOL} in "
                            f"{TRACEFS}): {exc}") from None
        self._pipe = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        self._pending = ""

    def _read(self) -> bool:
        """Apply what the kernel has buffered; False if there was nothing."""
        try:
            chunk = os.read(self._pipe, 1 << 16).decode(errors="replace")
        except BlockingIOError:
            return False
        if not chunk:
            return False
        self._pending += chunk
        done, _, self._pending = self._pending.rpartition("\n")
        if done:
            self.flushes += apply_flushes(self.image, self.base, done)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # trace_pipe's poll may wait for the buffer to fill (buffer_percent): read anyway.
            select.select([self._pipe], [], [], 0.05)
            while self._read():
                pass

    def close(self) -> None:
        """Everything buffered is applied, the kprobe removed."""
        while self._read():
            pass
        os.close(self._pipe)
        remove_trace(self.group, self.instance)


class FlushTracer:
    """In the target: starts the ``NativeFlushTrace`` helper process, and stops it cleanly."""

    def __init__(self, image: DurableImage) -> None:
        region = image.region
        self.sidecar = Path(f"{image.path}.native")
        self.sidecar.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pmemblk.powercut", region.path, image.path,
             str(region.addr)], start_new_session=True)  # outlives a SIGKILLed target
        deadline = time.monotonic() + 60
        while not self.sidecar.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise PmemError("the native FLUSH tracer did not start (see its error above)")
            time.sleep(0.05)
        self._closed = False
        log.warning("TESTING ONLY: native FLUSHes traced into the durable image (kprobe on %s, "
                    "helper PID %d)", FLUSH_SYMBOL, self.proc.pid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.proc.terminate()
        self.proc.wait()


def _helper(region_path: str, image_path: str, base: int) -> int:
    """``python -m pmemblk.powercut REGION IMAGE BASE``: the tracer process."""
    logging.basicConfig(level=logging.INFO, format="pmemblk flush tracer: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sidecar = Path(f"{image_path}.native")
    with PmemRegion.open(region_path) as region:
        image = DurableImage(image_path, region)
        try:
            trace = NativeFlushTrace(image, base)
        except PmemError as exc:
            log.error("%s", exc)
            image.close()
            return 1
        files.write_atomic(str(sidecar), json.dumps(
            {"pid": os.getpid(), "instance": str(trace.instance), "group": trace.group,
             "base": base}).encode(), 0o600, "the flush tracer's record")
        try:
            trace.run(stop)
        finally:
            trace.close()
            image.close()
            sidecar.unlink(missing_ok=True)
    log.info("%d native FLUSHes copied into %s", trace.flushes, image_path)
    return 0


#: The tracer helper's sidecar record: its fields and their types.
_SIDECAR: dict[str, type] = {"pid": int, "instance": str, "group": str, "base": int}


def _read_sidecar(image_path: str) -> dict[str, Any] | None:
    """The record a tracer helper left beside the image (None: there is none); PmemError,
    one line, if it is torn or of the wrong types."""
    sidecar = Path(f"{image_path}.native")
    try:
        info = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PmemError(f"the flush tracer's record {sidecar} cannot be read ({exc}): if no "
                        "tracer runs for this image, remove it") from None
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t)
                                         for k, t in _SIDECAR.items()):
        raise PmemError(f"the flush tracer's record {sidecar} is not one: if no tracer runs "
                        "for this image, remove it")
    return info


def _is_helper(pid: int, image_path: str) -> bool:
    """Whether process ``pid`` is the tracer helper of ``image_path`` (a PID in a record
    left by a helper that died may be another process's by now)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return (len(args) > 4 and args[1:3] == [b"-m", b"pmemblk.powercut"]
                and os.path.samefile(os.path.join(f"/proc/{pid}/cwd", os.fsdecode(args[4])),
                                     image_path))
    except (OSError, ValueError):
        return False


def _stop_helper(image_path: str) -> None:
    """Stop a tracer helper still running (its target was killed): SIGTERM, then wait until
    it drained and removed its sidecar file."""
    sidecar = Path(f"{image_path}.native")
    info = _read_sidecar(image_path)
    if info is None or not _is_helper(info["pid"], image_path):
        return
    pid = info["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while sidecar.exists() and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break  # gone without cleaning up: its leftovers are applied next
        if state == "Z":
            break
        time.sleep(0.05)


def apply_flushes(image: DurableImage, base: int, text: str) -> int:
    """Copy each traced FLUSH's range (inside the region) into the image; how many."""
    n = 0
    for iova_s, length_s in _EVENT.findall(text):
        offset, length = int(iova_s, 16) - base, int(length_s)
        if offset >= 0 and offset + length <= image.region.size:  # else another region's
            image.on_persist(offset, length)
            n += 1
    return n


def _tracefs_write(path: Path, text: str) -> None:
    """One write(2), appending (Python's append mode seeks, which tracefs refuses)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def remove_trace(group: str, instance: Path) -> None:
    with contextlib.suppress(OSError):
        _tracefs_write(instance / "events" / group / "flush" / "enable", "0")
    with contextlib.suppress(OSError):
        instance.rmdir()
    with contextlib.suppress(OSError):
        _tracefs_write(TRACEFS / "kprobe_events", f"-:{group}/flush\n")


def _leftover_native_flushes(region: PmemRegion, image_path: str) -> int:
    """The native FLUSHes a tracer helper that died without draining left in the kernel's
    buffer, applied now (and its kprobe removed)."""
    sidecar = Path(f"{image_path}.native")
    info = _read_sidecar(image_path)
    if info is None:
        return 0
    instance, group = Path(info["instance"]), info["group"]
    try:
        text = (instance / "trace").read_text(errors="replace")
    except OSError:
        text = ""
    image = DurableImage(image_path, region)
    try:
        n = apply_flushes(image, int(info["base"]), text)
    finally:
        image.close()
    remove_trace(group, instance)
    sidecar.unlink()
    return n


@dataclass(frozen=True)
class PowerCut:
    unpersisted_words: int
    kept_words: int

    @property
    def lost_words(self) -> int:
        return self.unpersisted_words - self.kept_words


def power_cut(region_path: str, image_path: str, keep: float = 0.0, seed: int = 0) -> PowerCut:
    """Replace the region (and the image) by what a power cut would leave. Target stopped."""
    if not 0.0 <= keep <= 1.0:
        raise PmemError(f"keep fraction {keep} is outside 0..1")
    check_region_path(region_path)
    if not os.path.isfile(image_path):
        raise PmemError(f"durable image {image_path} is not a file (serve with "
                        "--testing-durable-image PATH makes one)")
    _stop_helper(image_path)
    with RegionLock(region_path, "emulate a power cut on it"), \
            PmemRegion.open(region_path) as region:  # mapped: a devdax region has no read()
        if os.path.getsize(image_path) != region.size:
            raise PmemError(f"durable image {image_path} is not the size of {region_path}")
        applied = _leftover_native_flushes(region, image_path)
        if applied:
            log.info("applied %d native FLUSHes the target had not yet", applied)
        return _cut(region, image_path, keep, seed)


def _cut(region: PmemRegion, image_path: str, keep: float, seed: int) -> PowerCut:
    rng = random.Random(seed)
    unpersisted = kept = 0
    size = region.size
    try:
        dfd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise PmemError(f"cannot open durable image {image_path}: {exc.strerror}") from None
    try:
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            vol = region.read(off, n)
            dur = os.pread(dfd, n, off)
            if vol == dur:
                continue
            out = bytearray(dur)
            for b in range(0, len(vol), BLOCK):
                if vol[b:b + BLOCK] == dur[b:b + BLOCK]:
                    continue
                for w in range(b, min(b + BLOCK, n), WORD):
                    if vol[w:w + WORD] != dur[w:w + WORD]:
                        unpersisted += 1
                        if rng.random() < keep:
                            out[w:w + WORD] = vol[w:w + WORD]
                            kept += 1
            region.write(off, bytes(out))
            os.pwrite(dfd, out, off)
        # the machine restarts: a new boot
        region.write(layout.BOOT_ID_OFFSET, bytes(16))
        os.pwrite(dfd, bytes(16), layout.BOOT_ID_OFFSET)
        region.persist(0, size)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return PowerCut(unpersisted, kept)


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1], sys.argv[2], int(sys.argv[3])))
