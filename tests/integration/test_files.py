"""Every file pmemblk writes, written safely: through a temporary name nobody can plant a link
at (root must never follow a link another user made), in folders nobody else can write, whole
or not at all on a full disk, with one line when it cannot (issue 24, items 5 and 7)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import files, install
from pmemblk.errors import ConfigError

from ..procs import Target, our_nbdkits, pmemblk, run
from .conftest import needs_nbdkit
from .test_daytwo import one_line
from .test_hostile import needs_root, one_error_line

NOBODY = 65534


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious\n")
    path.chmod(0o600)
    return path


def test_a_link_planted_at_the_old_temporary_name_is_not_followed(tmp_path: Path,
                                                                   victim: Path) -> None:
    """install-plugin/install-units wrote ``.NAME.PID.tmp`` with O_CREAT|O_TRUNC, chmod-ed it by
    name and renamed it: a link planted there made root overwrite (and chmod) any file."""
    folder = tmp_path / "units"
    folder.mkdir(mode=0o755)
    for name in install.UNITS:
        (folder / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    install.install_units(str(folder))
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o600
    for name in install.UNITS:
        assert "ExecStart" in (folder / name).read_text()
        assert (folder / name).stat().st_mode & 0o777 == 0o644


def test_write_atomic_never_opens_what_is_there_and_replaces_a_link_not_its_target(
        tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "out.prom"
    link.symlink_to(victim)
    files.write_atomic(str(link), b"new\n", 0o600)
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == "new\n"
    assert link.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.prom", "victim"]


@needs_root
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another user's"])
def test_an_install_folder_another_user_can_write_is_refused(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir(mode=0o755)
    if how == "another user's":
        os.chown(folder, NOBODY, NOBODY)
    else:
        folder.chmod(0o777 if how == "world-writable" else 0o775)
    with pytest.raises(ConfigError, match=r"belongs to user 65534|can be written by other"):
        install.install_units(str(folder))
    assert list(folder.iterdir()) == []
    res = pmemblk("install-plugin", "--plugindir", str(folder), check=False)
    assert "install directory" in one_error_line(res)
    assert list(folder.iterdir()) == []


@pytest.fixture
def target(region: str, tmp_path: Path) -> Iterator[Target]:
    t = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()
    yield t
    t.stop()
    for pid in our_nbdkits(tmp_path):  # an attach that should have been refused, and was not
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@needs_nbdkit
@needs_root
def test_attach_refuses_a_run_dir_of_another_user_and_a_planted_lock_link(
        target: Target, tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(theirs))
    line = one_line(pmemblk("attach", target.listen, "--no-device", check=False))
    assert "belongs to user 65534" in line and list(theirs.iterdir()) == []
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    (ours / ".lock").symlink_to(victim)
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(ours))
    line = one_line(pmemblk("attach", target.listen, "--no-device", check=False))
    assert ".lock" in line and "symlink" in line, line
    assert victim.read_text() == "precious\n"


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 64 KiB, filled to the last byte."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt))
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"\0" * 512)
        finally:
            os.close(fd)
        yield mnt
    finally:
        run("umount", str(mnt))


@needs_root
def test_secret_on_a_full_disk_is_one_line_and_leaves_nothing(full: Path) -> None:
    """It was a traceback and an empty secret file that `secret` then refused to overwrite."""
    res = pmemblk("secret", str(full / "s.secret"), check=False)
    assert "cannot write secret" in one_error_line(res) and "No space left" in res.stderr
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
    (full / "filler").unlink()
    pmemblk("secret", str(full / "s.secret"))
    assert len((full / "s.secret").read_text()) == 65


@needs_root
def test_textfile_and_install_on_a_full_disk_are_one_line_and_leave_nothing(
        full: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot write --textfile .*No space left"):
        files.write_atomic(str(full / "m.prom"), b"x" * 8192, 0o644, "--textfile")
    with pytest.raises(ConfigError, match="No space left"):
        install.install_units(str(full))
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


@needs_nbdkit
@needs_root
def test_attach_on_a_full_run_dir_is_one_line_and_leaves_nothing(
        target: Target, full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(full))
    line = one_line(pmemblk("attach", target.listen, "--no-device", "--name", "f",
                            check=False))
    assert "No space left" in line, line
    assert sorted(p.name for p in full.iterdir()) == [".lock", "filler"]
