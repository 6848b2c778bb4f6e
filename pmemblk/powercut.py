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
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass

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
    size = check_region_path(region_path).st_size
    if not os.path.isfile(image_path):
        raise PmemError(f"durable image {image_path} is not a file (serve with "
                        "--testing-durable-image PATH makes one)")
    if os.path.getsize(image_path) != size:
        raise PmemError(f"durable image {image_path} is not the size of {region_path}")
    with RegionLock(region_path, "emulate a power cut on it"):
        return _cut(region_path, image_path, size, keep, seed)


def _cut(region_path: str, image_path: str, size: int, keep: float, seed: int) -> PowerCut:
    rng = random.Random(seed)
    unpersisted = kept = 0
    rfd = os.open(region_path, os.O_RDWR)
    dfd = os.open(image_path, os.O_RDWR)
    try:
        for off in range(0, size, CHUNK):
            vol = os.pread(rfd, CHUNK, off)
            dur = os.pread(dfd, CHUNK, off)
            if vol == dur:
                continue
            out = bytearray(dur)
            for b in range(0, len(vol), BLOCK):
                if vol[b:b + BLOCK] == dur[b:b + BLOCK]:
                    continue
                for w in range(b, b + BLOCK, WORD):
                    if vol[w:w + WORD] != dur[w:w + WORD]:
                        unpersisted += 1
                        if rng.random() < keep:
                            out[w:w + WORD] = vol[w:w + WORD]
                            kept += 1
            os.pwrite(rfd, out, off)
            os.pwrite(dfd, out, off)
        for fd in (rfd, dfd):  # the machine restarts: a new boot
            os.pwrite(fd, bytes(16), layout.BOOT_ID_OFFSET)
        os.fsync(rfd)
        os.fsync(dfd)
    finally:
        os.close(rfd)
        os.close(dfd)
    return PowerCut(unpersisted, kept)
