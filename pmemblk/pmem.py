"""libpmem through ctypes: map a region, persist ranges of it, unmap.

A region is a file (on a DAX filesystem or not) or a devdax character device. When libpmem says
the mapping is real persistent memory, ``persist`` flushes CPU caches (``pmem_persist``); otherwise
it calls ``pmem_msync``, which is what durability means for a page-cache backed file. Which one is
in use is logged at map time and reported by ``pmemblk info``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import PmemError
from .memkind import MemoryKind, region_kind
from .resource import Closeable

log = logging.getLogger(__name__)

PMEM_FILE_CREATE = 1 << 0
PMEM_FILE_EXCL = 1 << 1

_LIBPMEM_NAME = "libpmem.so.1"
_lib: Any = None


def _libpmem() -> Any:
    """Load libpmem once; a missing library is one clear error naming the package."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(_LIBPMEM_NAME, use_errno=True)
        except OSError as e:
            raise PmemError(
                f"cannot load {_LIBPMEM_NAME} ({e}); install the Debian package libpmem1 "
                "(apt-get install libpmem1)"
            ) from None
        lib.pmem_map_file.restype = ctypes.c_void_p
        lib.pmem_map_file.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_int),
        ]
        lib.pmem_unmap.restype = ctypes.c_int
        lib.pmem_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_persist.restype = None
        lib.pmem_persist.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_msync.restype = ctypes.c_int
        lib.pmem_msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_errormsg.restype = ctypes.c_char_p
        lib.pmem_errormsg.argtypes = []
        _lib = lib
    return _lib


def _errormsg(lib: Any) -> str:
    msg = lib.pmem_errormsg()
    return msg.decode(errors="replace") if msg else "unknown libpmem error"


def is_devdax(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and _is_dax_char(st)


def _is_dax_char(st: os.stat_result) -> bool:
    """Whether a character device belongs to the kernel's dax subsystem (as libpmem checks)."""
    link = f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/subsystem"
    return os.path.basename(os.path.realpath(link)) == "dax"


def check_region_path(path: str) -> os.stat_result:
    """The region's ``stat``; refuses what cannot be a region (a directory, FIFO, socket...)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PmemError(f"{path}: no such file or device") from None
    except OSError as exc:
        raise PmemError(f"{path}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO"
                if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a block device (use its devdax namespace, or a file)"
                if stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise PmemError(f"{path} is {kind}: a region is a regular file or a devdax device")
    if stat.S_ISCHR(st.st_mode) and not _is_dax_char(st):
        raise PmemError(f"{path} is a character device but not a devdax device (ndctl "
                        "create-namespace -m devdax makes one): a region is a regular file or "
                        "a devdax device")
    return st


#: allocate() reports progress after each step of this many bytes.
ALLOCATE_STEP = 256 << 20


def allocate(fd: int, path: str, size: int,
             progress: Callable[[int], None] | None = None) -> None:
    """Give every byte of the file open at ``fd`` its storage now (posix_fallocate), so that no
    store into the mapping can ever fault for want of space (SIGBUS). ``progress`` is called
    with the bytes done after each ALLOCATE_STEP (on tmpfs, or where glibc emulates
    fallocate by writing, a multi-GiB region takes a while)."""
    done = 0
    try:
        while done < size:
            step = min(ALLOCATE_STEP, size - done) if progress is not None else size - done
            os.posix_fallocate(fd, done, step)
            done += step
            if progress is not None:
                progress(done)
    except OSError as exc:
        hints = {errno.ENOSPC: " (the filesystem has no room for it)",
                 errno.EFBIG: " (larger than the filesystem allows for one file)"}
        hint = hints.get(exc.errno or 0, "")
        raise PmemError(f"cannot allocate {size} bytes for {path}: {exc.strerror}{hint}") from None


def check_backed(path: str) -> None:
    """Refuse a region file with holes: a store into a hole on a full filesystem kills the
    process with SIGBUS. (Allocated blocks are counted: SEEK_HOLE also reports allocated,
    never-written extents, which are fine.)"""
    st = check_region_path(path)
    if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size:
        raise PmemError(
            f"{path} is sparse ({st.st_blocks * 512} of its {st.st_size} bytes have storage): "
            "writing into a hole can fail for want of space and kill the target with SIGBUS. "
            f"Allocate it, keeping its data: fallocate -l {st.st_size} {path}")


class PmemRegion(Closeable):
    """A mapped pmem region. A context manager; ``close()`` is safe to call twice.

    Use :meth:`open` for an existing file or device and :meth:`create` for a new file.
    """

    def __init__(self, path: str, addr: int, size: int, is_pmem: bool,
                 memory: MemoryKind | None = None) -> None:
        self.path = path
        self.addr = addr
        self.size = size
        self.is_pmem = is_pmem
        #: What the memory is (pmemblk.memkind): a devdax device is not always persistent.
        self.memory = memory if memory is not None else region_kind(os.stat(path), is_pmem)
        self._closed = False
        #: Called with (offset, length) after each successful persist (power-cut emulation).
        self.on_persist: Callable[[int, int], None] | None = None
        #: Called with (offset, length) before each persist; raises to fail it (fault
        #: injection, pmemblk.faults).
        self.persist_fault: Callable[[int, int], None] | None = None
        log.info(
            "mapped %s: %d bytes at 0x%x, is_pmem=%d, persistence by %s; memory: %s",
            path, size, addr, int(is_pmem), self.persist_method, self.memory.describe(),
        )
        if not self.memory.persistent:
            log.warning("%s is %s: no flush method gives persistence on it",
                        path, self.memory.describe())

    @property
    def persist_method(self) -> str:
        return "pmem_persist" if self.is_pmem else "pmem_msync"

    @classmethod
    def open(cls, path: str) -> PmemRegion:
        """Map an existing file or devdax device, whole."""
        st = check_region_path(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # mmap would say EINVAL
            raise PmemError(f"{path} is empty (0 bytes): it holds no pmemblk region. Create "
                            f"one with: pmemblk create {path} --size SIZE")
        return cls._map(path, 0, 0)

    @classmethod
    def create(cls, path: str, size: int) -> PmemRegion:
        """Create a new file of ``size`` bytes (refuses an existing one) and map it."""
        if size <= 0:
            raise PmemError(f"cannot create {path}: size must be positive, got {size}")
        return cls._map(path, size, PMEM_FILE_CREATE | PMEM_FILE_EXCL)

    @classmethod
    def _map(cls, path: str, length: int, flags: int) -> PmemRegion:
        lib = _libpmem()
        mapped = ctypes.c_size_t(0)
        is_pmem = ctypes.c_int(0)
        addr = lib.pmem_map_file(
            os.fsencode(path), length, flags, 0o600, ctypes.byref(mapped), ctypes.byref(is_pmem)
        )
        if not addr:
            err = ctypes.get_errno()
            hint = ""
            if err == errno.EINVAL:
                hint = (
                    " (the filesystem may not support shared writable mappings, e.g. a 9p or "
                    "virtiofs share: put the region on a local filesystem, /dev/shm or devdax)"
                )
            elif err == errno.EEXIST:
                hint = " (it already exists)"
            raise PmemError(f"cannot map {path}: {_errormsg(lib)}{hint}")
        return cls(path, int(addr), int(mapped.value), bool(is_pmem.value))

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise PmemError(f"{self.path}: region is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PmemError(
                f"{self.path}: range [{offset}, {offset + length}) is outside the "
                f"{self.size}-byte region"
            )

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of part of the mapping. Invalid after close(): do not keep it."""
        self._check(offset, length)
        return memoryview((ctypes.c_char * length).from_address(self.addr + offset)).cast("B")

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.view(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        self.view(offset, len(data))[:] = data

    def store_u64(self, offset: int, value: int) -> None:
        """One aligned 8-byte store: atomic with respect to power failure on pmem."""
        if offset % 8:
            raise PmemError(f"store_u64 at unaligned offset {offset}")
        self._check(offset, 8)
        ctypes.c_uint64.from_address(self.addr + offset).value = value

    def persist(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) durable: cache flush on pmem, msync otherwise."""
        self._check(offset, length)
        if length == 0:
            return
        if self.persist_fault is not None:
            self.persist_fault(offset, length)
        lib = _libpmem()
        if self.is_pmem:
            lib.pmem_persist(self.addr + offset, length)
        elif lib.pmem_msync(self.addr + offset, length) != 0:
            raise PmemError(
                f"pmem_msync of {length} bytes at offset {offset} of {self.path} failed: "
                f"{_errormsg(lib)}"
            )
        if self.on_persist is not None:
            self.on_persist(offset, length)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _libpmem().pmem_unmap(self.addr, self.size) != 0:
            log.warning("pmem_unmap of %s failed: %s", self.path, _errormsg(_libpmem()))
