"""The Python ceiling for scripts/bench: the most trivial in-memory nbdkit Python plugin.

    nbdkit python bench/memory_plugin.py size=256M

No I/O beyond a bytearray: what nbdkit's Python plugin costs per request, nothing else.
"""

import nbdkit

API_VERSION = 2
_size = 256 * 1024 * 1024
_disk = bytearray()


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    global _size
    if key != "size":
        raise RuntimeError(f"unknown key {key}")
    _size = nbdkit.parse_size(value)


def config_complete() -> None:
    global _disk
    _disk = bytearray(_size)


def open(readonly: bool) -> int:
    return 1


def get_size(h: int) -> int:
    return _size


def can_multi_conn(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return int(nbdkit.FUA_NATIVE)


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = _disk[offset:offset + len(buf)]


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    _disk[offset:offset + len(buf)] = buf


def flush(h: int, flags: int) -> None:
    pass
