"""Running the programs pmemblk drives (nbdkit, nbd-client, Debian's python3): one wrapper that
logs the command, bounds its time, and turns every way it can fail into one ``ServiceError``
line that names the command and what it said (mkosi's ``run``, in small)."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

from .errors import ServiceError

log = logging.getLogger(__name__)


def run(argv: Sequence[str], *, timeout: float, check: bool = True,
        env: Mapping[str, str] | None = None, cwd: str | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end, its input empty, its output captured (``stdout``: or sent to
    a file). ``ServiceError`` if it cannot start, does not end within ``timeout`` seconds (it
    is killed), or, with ``check``, exits with a non-zero status."""
    command = shlex.join(argv)
    log.debug("running %s", command)
    try:
        res = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=stdout,
                             stderr=subprocess.PIPE, text=True, timeout=timeout, env=env,
                             cwd=cwd)
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} is not installed (running {command})") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{command} did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise ServiceError(f"cannot run {command}: {exc.strerror or exc}") from None
    if check and res.returncode != 0:
        raise ServiceError(f"{command} failed (exit status {res.returncode}): {said(res)}")
    return res


def said(res: subprocess.CompletedProcess[str]) -> str:
    """The last line a finished command wrote to its error output (or "no output")."""
    lines = (res.stderr or "").strip().splitlines()
    return lines[-1] if lines else "no output"
