"""A target restart under a mounted ext4 with fio verifying: the kernel device never notices."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from ..conftest import report
from ..procs import NbdDevice, Nbdkit, mounted, pmemblk, run, wait_until
from .harness import vm_target

SIZE = 256 << 20
FIO_SIZE = 48 << 20


def sectors_written(dev: NbdDevice) -> int:
    return int(Path(f"/sys/block/{dev.name}/stat").read_text().split()[6])


@pytest.mark.parametrize("how", ["SIGKILL"])
def test_target_restart_during_fio_verify_on_ext4(shm_region: Path, workdir: Path,
                                                  how: str) -> None:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    target = vm_target(str(shm_region), 7700, workdir).start()
    server = Nbdkit(workdir, *target.keys).start()
    dev = NbdDevice()
    fio = None
    try:
        dev.attach(server)
        run("mkfs.ext4", "-q", "-F", dev.dev)
        with mounted(dev, workdir / "mnt") as mnt:
            job = ["fio", "--name=restart", f"--directory={mnt}", "--rw=randwrite", "--bs=4k",
                   f"--size={FIO_SIZE}", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                   "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                   "--verify_state_save=0", "--fsync_on_close=1", "--output-format=json"]
            run(*job, "--create_only=1")  # lay the file out first: the count below is fio's I/O
            run("sync")
            start = sectors_written(dev)
            fio = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            # Restart the target once fio has written a quarter of its file.
            wait_until(lambda: sectors_written(dev) - start >= FIO_SIZE // 4 // 512
                       or fio.poll() is not None, "fio to get going", timeout=600)
            assert fio.poll() is None, "fio finished before the restart: make FIO_SIZE larger"
            target.stop(getattr(signal, how))
            target = target.restart()
            out, err = fio.communicate(timeout=900)
            assert fio.returncode == 0, out + err
            job = json.loads(out)["jobs"][0]
            assert job["error"] == 0
            verified = job["read"]["io_bytes"]
            assert verified >= FIO_SIZE
        fsck = run("fsck.ext4", "-fn", dev.dev)
        assert "clean" in fsck.stdout or fsck.returncode == 0
        log = server.log()
        # One restart, one reconnect: a channel that failed to open (it once raced another
        # for its completion channel's descriptor) counted as a second one.
        assert log.count("reconnected to the target") == 1, log
        report(f"target {how} + restart during fio randwrite --verify=crc32c on a mounted ext4 "
               f"(rxe): {verified >> 20} MiB verified, 0 errors, "
               "1 reconnect, fsck -fn clean")
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        dev.detach()
        server.stop()
        target.stop()
