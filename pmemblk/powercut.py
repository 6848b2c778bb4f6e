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
``rxe_flush_pmem_iova(mr, iova, length)``; a kprobe on it, in a tracefs instance of the
target's own, reports each one, and a thread copies the range into the image. Events the
thread has not read when the target dies stay in that instance's buffer, and
``testing-power-cut`` applies them before it cuts (``IMAGE.native`` says where they are).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import select
import threading
from dataclasses import dataclass
from pathlib import Path

from . import layout
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
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PmemError(f"durable image {path}: {exc.strerror}") from None
        self._closed = False
        # Persists run on several channels' threads at once: an older copy of a range must
        # never land in the image after a newer one.
        self._lock = threading.Lock()
        if not exists:  # what is in the region now is the durable starting point
            for off in range(0, region.size, CHUNK):
                os.pwrite(self.fd, region.read(off, min(CHUNK, region.size - off)), off)
        elif os.fstat(self.fd).st_size != region.size:
            os.close(self.fd)
            raise PmemError(f"durable image {path} is not the size of {region.path}")
        region.on_persist = self.on_persist
        log.warning("TESTING ONLY: power-cut emulation on; durable image %s", path)

    def on_persist(self, offset: int, length: int) -> None:
        start = offset // LINE * LINE
        end = min(self.region.size, -(-(offset + length) // LINE) * LINE)
        with self._lock:
            os.pwrite(self.fd, self.region.read(start, end - start), start)

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
    (see the module's docstring). Needs root, tracefs and kprobe events (the VM has them)."""

    def __init__(self, image: DurableImage) -> None:
        self.image = image
        region = image.region
        self.group = f"pmemblk_{os.getpid()}"
        self.instance = TRACEFS / "instances" / self.group
        self.sidecar = Path(f"{image.path}.native")
        self.flushes = 0
        self._stop = threading.Event()
        self._closed = False
        try:
            with open(TRACEFS / "kprobe_events", "a") as f:
                f.write(f"p:{self.group}/flush {FLUSH_SYMBOL} iova=%si:x64 len=%dx:u32\n")
            self.instance.mkdir()
            (self.instance / "events" / self.group / "flush" / "enable").write_text("1")
        except OSError as exc:
            self._remove()
            raise PmemError(f"cannot trace native FLUSHes (kprobe on {FLUSH_SYMBOL} in "
                            f"{TRACEFS}): {exc}") from None
        self.sidecar.write_text(json.dumps({"instance": str(self.instance), "group": self.group,
                                            "base": region.addr, "size": region.size}))
        self._pipe = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._follow, name="native-flush-trace",
                                        daemon=True)
        self._thread.start()
        log.warning("TESTING ONLY: native FLUSHes traced into the durable image (kprobe %s/flush"
                    " on %s)", self.group, FLUSH_SYMBOL)

    def _apply(self, text: str) -> None:
        apply_flushes(self.image, self.image.region.addr, text)
        self.flushes += len(_EVENT.findall(text))

    def _follow(self) -> None:
        pending = ""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._pipe], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(self._pipe, 1 << 16).decode(errors="replace")
            except BlockingIOError:
                continue
            pending += chunk
            done, _, pending = pending.rpartition("\n")
            if done:
                self._apply(done)

    def close(self) -> None:
        """A clean stop: everything traced is applied, the kprobe removed."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._pipe, 1 << 16):
                self._apply(chunk.decode(errors="replace"))
        os.close(self._pipe)
        self._remove()
        self.sidecar.unlink(missing_ok=True)

    def _remove(self) -> None:
        remove_trace(self.group, self.instance)


def apply_flushes(image: DurableImage, base: int, text: str) -> int:
    """Copy each traced FLUSH's range (inside the region) into the image; how many."""
    n = 0
    for iova_s, length_s in _EVENT.findall(text):
        offset, length = int(iova_s, 16) - base, int(length_s)
        if offset >= 0 and offset + length <= image.region.size:  # else another region's
            image.on_persist(offset, length)
            n += 1
    return n


def remove_trace(group: str, instance: Path) -> None:
    with contextlib.suppress(OSError):
        (instance / "events" / group / "flush" / "enable").write_text("0")
    with contextlib.suppress(OSError):
        instance.rmdir()
    with contextlib.suppress(OSError), open(TRACEFS / "kprobe_events", "a") as f:
        f.write(f"-:{group}/flush\n")


def _leftover_native_flushes(region: PmemRegion, image_path: str) -> int:
    """The native FLUSHes a killed target's trace thread had not applied, applied now."""
    sidecar = Path(f"{image_path}.native")
    if not sidecar.exists():
        return 0
    info = json.loads(sidecar.read_text())
    instance, group = Path(info["instance"]), str(info["group"])
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
    dfd = os.open(image_path, os.O_RDWR)
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
