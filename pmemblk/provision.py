"""Making a region: ``pmemblk create`` on a new file, an existing file, or a devdax device.

Every byte of a file region is allocated before the header is written (a sparse region would die
with SIGBUS when its filesystem fills up). An existing region is rewritten in place, under the
region lock (``pmemblk.lock``), so a region being served is refused rather than replaced behind
its target's back. A failure leaves nothing half-made: a file this command created is removed,
an existing one is left as it was when the failure comes before formatting.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import atomicblocks, layout
from .errors import ConfigError, LayoutError
from .lock import RegionLock
from .pmem import PmemRegion, allocate, check_region_path


@dataclass(frozen=True)
class Created:
    header: layout.Header
    #: The atomic-blocks geometry (None: a plain region).
    atomic: atomicblocks.Info | None
    is_pmem: bool
    persist_method: str


def _format(path: str, block_size: int, lanes: int | None, keep_existing: bool = False,
            devdax_size: int | None = None) -> Created:
    with PmemRegion.open(path) as region:
        if devdax_size is not None and devdax_size != region.size:
            raise ConfigError(f"{path} is a devdax device of {region.size} bytes: its size is "
                              "fixed, so leave out --size")
        if keep_existing and layout.has_header(region):
            raise ConfigError(f"{path} already holds a pmemblk region; pass --force to erase it")
        try:
            header = layout.format_region(region, block_size, lanes)
        except LayoutError as exc:
            raise ConfigError(str(exc)) from None
        return Created(header, layout.read_atomic_info(region, header), region.is_pmem,
                       region.persist_method)


def create_region(path: str, size: int | None, block_size: int, force: bool,
                  progress: Callable[[int], None] | None = None,
                  lanes: int | None = None) -> Created:
    """Create (or with ``force``, recreate) the region at ``path``; ``progress`` sees the
    bytes allocated so far (pmem.allocate). ``lanes``: lay out atomic blocks with that many
    lanes (pmemblk.atomicblocks)."""
    layout.check_block_size(block_size, ConfigError)
    if lanes is not None:
        if block_size not in atomicblocks.SECTOR_SIZES:
            raise ConfigError(f"--atomic-blocks needs --block-size 512 or 4096, not {block_size}")
        if not 1 <= lanes <= atomicblocks.MAX_LANES:
            raise ConfigError(f"--lanes {lanes} is out of range 1..{atomicblocks.MAX_LANES}")
    if size is not None and size < 2 * layout.DATA_ALIGN:
        raise ConfigError(f"--size {size} is too small: the header takes {layout.DATA_ALIGN} "
                          "bytes and at least one block must follow (e.g. --size 64M)")
    if not os.path.lexists(path):
        if size is None:
            raise ConfigError(f"{path} does not exist: give its size with --size, e.g. --size 1G")
        return _create_file(path, size, block_size, progress, lanes)
    st = check_region_path(path)
    if stat.S_ISCHR(st.st_mode):  # devdax: fixed size, rewritten in place
        with RegionLock(path, "create a region on it"):
            return _format(path, block_size, lanes, keep_existing=not force,
                           devdax_size=size)
    if not force:
        raise ConfigError(f"{path} already exists; pmemblk never overwrites silently: pass "
                          "--force to erase it and create a new region")
    with RegionLock(path, "erase it") as lock:
        size = st.st_size if size is None else size
        if size < 2 * layout.DATA_ALIGN:
            raise ConfigError(f"{path} holds {size} bytes, too small for a region: give "
                              "--size, e.g. --size 64M")
        if size != st.st_size:
            try:
                os.ftruncate(lock.fd, size)
            except OSError as exc:
                raise ConfigError(f"cannot resize {path} to {size} bytes: {exc.strerror}") from None
        allocate(lock.fd, path, size, progress)
        return _format(path, block_size, lanes)


def _create_file(path: str, size: int, block_size: int,
                 progress: Callable[[int], None] | None, lanes: int | None) -> Created:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with RegionLock(path, "create a region on it", fd=fd) as lock:
            allocate(lock.fd, path, size, progress)
            return _format(path, block_size, lanes)
    except BaseException:
        os.unlink(path)  # ours: made above with O_EXCL
        raise
