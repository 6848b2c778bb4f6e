"""A random NBD workload checked against an in-memory model (run under nbdkit --run).

    python3 workload.py URI [--seed N] [--ops N] [--max-size BYTES] [--model-out FILE]
                        [--announce N]

Reads, writes (some with FUA), zeroes and flushes of 1 byte to --max-size, aligned and not;
every read is compared with the model. With --model-out, the model as of the last completed
flush is written there (what must survive a crash). Prints one summary line; exits 1 on the
first mismatch. With --announce N, "at op N" is printed when op N starts (a test can then
disturb the target while the workload runs).
"""

from __future__ import annotations

import argparse
import random
import sys

import nbd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--max-size", type=int, default=4 << 20)
    ap.add_argument("--model-out")
    ap.add_argument("--announce", type=int, default=-1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = int(h.get_size())
    model = bytearray(h.pread(size, 0)) if size <= 256 << 20 else None
    assert model is not None, "export too large for the model"
    flushed = bytes(model)
    counts = {"read": 0, "write": 0, "fua": 0, "zero": 0, "flush": 0}
    moved = 0

    def pick_size() -> int:
        r = rng.random()
        if r < 0.5:
            n = rng.randint(1, 8192)
        elif r < 0.9:
            n = rng.randint(1, 256 << 10)
        else:
            n = rng.randint(1, args.max_size)
        if rng.random() < 0.4:  # aligned
            n = max(4096, n // 4096 * 4096)
        return min(n, size)

    def pick_offset(n: int) -> int:
        off = rng.randint(0, size - n)
        return off // 4096 * 4096 if rng.random() < 0.4 else off

    for i in range(args.ops):
        if i == args.announce:
            print(f"at op {i}", flush=True)
        op = rng.random()
        if op < 0.4:
            n = pick_size()
            off = pick_offset(n)
            got = h.pread(n, off)
            counts["read"] += 1
            moved += n
            if got != model[off:off + n]:
                bad = next(k for k in range(n) if got[k] != model[off + k])
                print(f"MISMATCH at op {i}: read [{off}, {off + n}) differs at byte {off + bad}")
                return 1
        elif op < 0.8:
            n = pick_size()
            off = pick_offset(n)
            data = rng.randbytes(n)
            fua = rng.random() < 0.2
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            model[off:off + n] = data
            counts["fua" if fua else "write"] += 1
            moved += n
        elif op < 0.92:
            n = pick_size()
            off = pick_offset(n)
            h.zero(n, off)
            model[off:off + n] = bytes(n)
            counts["zero"] += 1
        else:
            h.flush()
            flushed = bytes(model)
            counts["flush"] += 1
    h.flush()
    flushed = bytes(model)
    if h.pread(size, 0) != model:
        print("MISMATCH: final full read differs from the model")
        return 1
    if args.model_out:
        with open(args.model_out, "wb") as f:
            f.write(flushed)
    h.shutdown()
    print(f"workload seed={args.seed}: {args.ops} ops "
          + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f"; {moved >> 20} MiB moved; 0 mismatches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
