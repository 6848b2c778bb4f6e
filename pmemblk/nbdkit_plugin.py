"""The nbdkit plugin's callbacks: a pmemblk target's region as an NBD export.

nbdkit runs a plugin script as ``__main__``; this module is that script's body, kept in the
package so an installed pmemblk has it. Three ways to load it, all the same callbacks:

    nbdkit pmemblk target=...                  after ``pmemblk install-plugin``
    nbdkit python plugin/pmemblk.py target=... from a checkout
    nbdkit python $(pmemblk plugin-path) ...   what ``pmemblk attach`` runs

Callbacks are in lifecycle order and only forward to pmemblk.plugin_instance; errors become
nbdkit.set_error(errno) and then raise. See docs/nbdkit-plugin.md.
"""

import errno
import logging
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import nbdkit

import pmemblk
from pmemblk.client import Client
from pmemblk.errors import PmemblkError
from pmemblk.plugin_instance import KEYS, PluginState, describe, keys_help

__all__ = [
    "API_VERSION", "after_fork", "block_size", "can_fast_zero", "can_flush", "can_fua",
    "can_multi_conn", "can_trim", "can_write", "can_zero", "cleanup", "close", "config",
    "config_complete", "config_help", "dump_plugin", "export_description", "flush", "get_size",
    "is_rotational", "open", "pread", "pwrite", "thread_model", "zero",
]

API_VERSION = 2
# nbdkit's config_help (its Python plugin does not read it yet; the man page has the same).
config_help = keys_help()

# nbdkit prints a failed callback with traceback.format_exception, which honours this limit:
# expected errors (PmemblkError) then read as one line. Unexpected ones are bugs: _guard logs
# their full traceback itself.
sys.tracebacklimit = 0
_ALL_FRAMES = 1000

_state = PluginState()
_log = logging.getLogger("pmemblk.plugin")


class _NbdkitLog(logging.Handler):
    """Library logs go to nbdkit's debug stream (-v); warnings and errors also to stderr,
    except a failed callback's error, which nbdkit prints itself."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        nbdkit.debug(msg)
        if record.levelno >= logging.WARNING and not getattr(record, "nbdkit_says_it", False):
            print(f"pmemblk: {record.levelname.lower()}: {msg}", file=sys.stderr, flush=True)


T = TypeVar("T")


def _guard(fn: Callable[..., T], *args: object) -> T:
    try:
        return fn(*args)
    except PmemblkError as exc:
        # For log=FILE: nbdkit prints this error too, to a stderr that is gone once it runs
        # in the background.
        _log.error("%s: %s", fn.__name__, exc, extra={"nbdkit_says_it": True})
        nbdkit.set_error(exc.errno)
        raise
    except Exception as exc:
        # A bug: logged with every frame. (logging's own formatting would honour
        # sys.tracebacklimit = 0 above and keep none.)
        frames = "".join(traceback.format_exception(exc, limit=_ALL_FRAMES))
        _log.error("internal error in %s (please report it):\n%s", fn.__name__, frames)
        nbdkit.set_error(errno.EIO)
        raise


def thread_model() -> int:
    # Requests run concurrently: each takes an idle channel (a queue pair, or a socket) from
    # the client's pool, opened on demand, so no thread waits for another's completion and
    # nothing on the data path is shared but the pool and the flush state (docs/design.md,
    # "Thread model").
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def dump_plugin() -> None:
    # nbdkit ... --dump-plugin: what this plugin is and which keys it takes.
    print(f"pmemblk_version={pmemblk.__version__}")
    print(f"pmemblk_keys={','.join(KEYS)}")


def config(key: str, value: str) -> None:
    _guard(_state.config.set, key, value)


def config_complete() -> None:
    _guard(_state.config.complete)
    root = logging.getLogger("pmemblk")
    if not any(isinstance(h, _NbdkitLog) for h in root.handlers):
        root.addHandler(_NbdkitLog())
        root.setLevel(logging.DEBUG)
        root.propagate = False  # importing pyverbs gives the root logger a handler
        if _state.config.log:
            to_file = logging.FileHandler(_state.config.log)
            to_file.setLevel(logging.INFO)
            to_file.setFormatter(logging.Formatter(
                "%(asctime)s pmemblk[%(process)d]: %(levelname)s: %(message)s"))
            root.addHandler(to_file)


def after_fork() -> None:
    # Threads started before nbdkit forks into the background die with the parent: the
    # control socket (control=PATH) starts here.
    _guard(_state.start_control)


def cleanup() -> None:
    _state.close()


def open(readonly: bool) -> Client:
    # Verbs resources are made here, after nbdkit forked: ones made before the fork are dead.
    return _guard(_state.open, readonly)


def close(h: Client) -> None:
    _state.closed(h)


def get_size(h: Client) -> int:
    return h.size


def block_size(h: Client) -> tuple[int, int, int]:
    # RDMA is byte-addressable: any alignment works; the region's block size is preferred. On
    # atomic blocks the sector is the unit (a part of one is merged into it, still atomic).
    return (1 if h.blocks is None else h.block_size, h.block_size, 32 * 1024 * 1024)


def export_description(h: Client) -> str:
    return describe(h)


def is_rotational(h: Client) -> bool:
    return False


def can_write(h: Client) -> bool:
    return not h.readonly


def can_flush(h: Client) -> bool:
    return True


def can_fua(h: Client) -> int:
    # Native: FUA persists just that write's range (a READ after it, or a one-range COMMIT),
    # which is cheaper than the full flush nbdkit would emulate it with.
    return int(nbdkit.FUA_NATIVE)


def can_zero(h: Client) -> bool:
    # Zeroing is RDMA WRITEs from a registered zero chunk: no zero buffer crosses Python.
    return True


def can_fast_zero(h: Client) -> bool:
    # Zeroing costs as much as writing: not "fast" in the NBD sense.
    return False


def can_trim(h: Client) -> bool:
    # The region is fixed memory: deallocation would free nothing, and zero covers the need.
    return False


def can_multi_conn(h: Client) -> bool:
    # Every NBD connection of this nbdkit shares one client: a FLUSH on any of them makes
    # every write completed on any of them persistent (a barrier on each channel that wrote,
    # then the COMMIT), and every read comes from the target's memory, so all connections see
    # the same data. Read-only connections have nothing to flush.
    return True


def pread(h: Client, buf: bytearray, offset: int, flags: int) -> None:
    _guard(h.pread, memoryview(buf), offset)


def pwrite(h: Client, buf: bytes, offset: int, flags: int) -> None:
    _guard(h.pwrite, memoryview(buf), offset, bool(flags & nbdkit.FLAG_FUA))


def zero(h: Client, count: int, offset: int, flags: int) -> None:
    # Never with FLAG_FAST_ZERO: can_fast_zero is false, so nbdkit refuses a request with
    # that flag itself, without calling the plugin (checked with libnbd's strict mode off).
    _guard(h.zero, offset, count, bool(flags & nbdkit.FLAG_FUA))


def flush(h: Client, flags: int) -> None:
    _guard(h.flush)
