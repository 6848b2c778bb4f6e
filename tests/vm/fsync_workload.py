"""Writes files into DIR, fsyncs each (and DIR), then logs "name sha256" to LOG and fsyncs it.

    python3 fsync_workload.py DIR LOG SEED

A line in LOG means that file's fsync returned: it must survive any crash after that. Runs
until killed or until 2,000 files; an I/O error ends it quietly.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys


def main() -> int:
    directory, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    dfd = os.open(directory, os.O_RDONLY)
    with open(log_path, "a") as log:
        for i in range(2000):
            size = rng.choice([1, 4095, 4096, 65536, 300_000, 1 << 20])
            data = rng.randbytes(size)
            name = f"f{i:05d}.bin"
            try:
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.fsync(dfd)
            except OSError:
                return 0
            log.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
            log.flush()
            os.fsync(log.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
