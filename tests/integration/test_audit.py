"""A hostile audit of issue 24's classes (item 7): files pmemblk writes on a full disk, the
wrong kind of file or socket where pmemblk expects its own, and records read back with the
wrong types. Each test here failed before its fix: a pid file that took the place of a FIFO,
a socket or a symlink (and was then removed with it), a status answer with wrongly typed fields
(a traceback), another server's answer printed or written as pmemblk metrics, a durable image
left short on a full disk (a traceback, then refused by every later serve), and an empty region
file told it was on a filesystem without shared mappings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..procs import PY, Target, our_nbdkits, pmemblk, run, wait_until
from .conftest import needs_nbdkit
from .test_files import full  # noqa: F401 - the fixture
from .test_hostile import needs_root, one_error_line, serve_once


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- --pid-file where something that is not a pid file is ------------------------------------


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(p))


def _link(p: Path) -> None:
    p.symlink_to(p.parent / "victim")


def _dangling(p: Path) -> None:
    p.symlink_to(p.parent / "nowhere")


def _dir(p: Path) -> None:
    p.mkdir()


OCCUPANTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "a FIFO": (_fifo, "is a FIFO"),
    "a socket": (_socket, "is a socket"),
    "a link to a victim": (_link, "is a symbolic link"),
    "a dangling link": (_dangling, "is a symbolic link"),
    "a directory": (_dir, "is a directory"),
}


@pytest.mark.parametrize("occupant", OCCUPANTS)
def test_a_pid_file_path_holding_something_else_is_refused_and_kept(
        region: str, tmp_path: Path, occupant: str) -> None:
    """serve renamed its pid file over a FIFO, a socket or a symlink and removed it on exit:
    what was there was gone."""
    make, message = OCCUPANTS[occupant]
    (tmp_path / "victim").write_text("root:x:0:0\n")
    where = tmp_path / "p.pid"
    make(where)
    before, listing = digest(region), sorted(os.listdir(tmp_path))
    res = serve_once(region, "--listen", f"unix:{tmp_path / 's.sock'}", "--pid-file",
                     str(where))
    assert message in one_error_line(res)
    assert os.path.lexists(where) and not stat.S_ISREG(os.lstat(where).st_mode)
    assert sorted(os.listdir(tmp_path)) == listing
    assert (tmp_path / "victim").read_text() == "root:x:0:0\n"
    assert digest(region) == before


def test_a_stale_pid_file_is_still_replaced(region: str, tmp_path: Path) -> None:
    """The refusal above is for what is not a regular file: an old pid file is replaced."""
    pid_file = tmp_path / "old.pid"
    pid_file.write_text("12345\n")
    proc = subprocess.Popen([PY, "-m", "pmemblk", "serve", region, "--transport", "tcp",
                             "--listen", f"unix:{tmp_path / 's.sock'}", "--pid-file",
                             str(pid_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: pid_file.read_text() == f"{proc.pid}\n" or proc.poll() is not None,
                   "the pid file")
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert not pid_file.exists()


# -- a control socket that is not ours -----------------------------------------------------


@contextlib.contextmanager
def answering(path: Path, answer: bytes) -> Iterator[None]:
    """A Unix socket at ``path`` that reads a request line and answers ``answer`` to it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                conn.recv(64)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


@pytest.fixture(scope="module")
def real_status(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What a real target answers to status (with a client connected, so clients has one)."""
    folder = tmp_path_factory.mktemp("real")
    region = str(folder / "r.img")
    pmemblk("create", region, "--size", "8M")
    control = folder / "ctl.sock"
    target = Target(region, f"unix:{folder / 't.sock'}", folder, "--control", str(control),
                    transport="tcp").start()
    try:
        value = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
    finally:
        target.stop()
    assert isinstance(value, dict) and "totals" in value
    return value


RETYPED: dict[str, dict[str, object]] = {
    "clients a number": {"clients": 5},
    "totals a list": {"totals": []},
    "uptime a string": {"uptime_s": "long"},
    "transports a number": {"transports": 2},
    "a client a string": {"clients": ["c1"]},
}


@pytest.mark.parametrize("how", [*RETYPED, "region missing"])
def test_a_status_with_wrongly_typed_fields_is_one_line(
        tmp_path: Path, real_status: dict[str, object], how: str) -> None:
    value = dict(real_status)
    if how == "region missing":
        del value["region"]
    else:
        value.update(RETYPED[how])
    sock = tmp_path / "other.sock"
    with answering(sock, json.dumps(value).encode()):
        res = pmemblk("status", "--target", str(sock), check=False)
        assert "answered a status pmemblk cannot show" in one_error_line(res), res.stderr
        assert res.stdout == ""
        shown = json.loads(pmemblk("status", "--target", str(sock), "--json").stdout)
        assert shown == value


def test_the_real_status_still_renders(tmp_path: Path, real_status: dict[str, object]) -> None:
    sock = tmp_path / "same.sock"
    with answering(sock, json.dumps(real_status).encode()):
        out = pmemblk("status", "--target", str(sock)).stdout
    assert out.startswith("target ") and "clients:" in out


NOT_METRICS = {
    "an HTTP server": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "a JSON answer": b'{"region": "x"}\n',
    "an error line": b"error: unknown request 'metrics': ask status\n",
    "nothing": b"",
    "another exporter": b"# HELP node_load1 Load.\n# TYPE node_load1 gauge\nnode_load1 0.5\n",
}


@pytest.mark.parametrize("what", NOT_METRICS)
def test_an_answer_that_is_not_pmemblk_metrics_is_neither_printed_nor_written(
        tmp_path: Path, what: str) -> None:
    """--prometheus printed it (exit 0) and --textfile gave it to node_exporter."""
    sock = tmp_path / "other.sock"
    textfile = tmp_path / "pmemblk.prom"
    with answering(sock, NOT_METRICS[what]):
        res = pmemblk("status", "--target", str(sock), "--prometheus", check=False)
        assert "is not pmemblk metrics" in one_error_line(res) and res.stdout == ""
        res = pmemblk("status", "--target", str(sock), "--textfile", str(textfile),
                      check=False)
        assert "is not pmemblk metrics" in one_error_line(res)
    assert sorted(os.listdir(tmp_path)) == ["other.sock"]


# -- the durable image on a full disk; an empty region file ----------------------------------


@needs_root
def test_a_durable_image_on_a_full_disk_is_one_line_and_leaves_nothing(
        region: str, tmp_path: Path, full: Path) -> None:  # noqa: F811
    """It was a traceback and a short image that every later serve refused ("not the
    size")."""
    before = digest(region)
    res = serve_once(region, "--listen", f"unix:{tmp_path / 's.sock'}",
                     "--testing-durable-image", str(full / "durable.img"))
    assert "cannot write durable image" in one_error_line(res) and "No space" in res.stderr
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
    assert digest(region) == before


def test_a_durable_image_is_not_created_through_a_dangling_link(region: str,
                                                                tmp_path: Path) -> None:
    (tmp_path / "img").symlink_to(tmp_path / "elsewhere.img")
    res = serve_once(region, "--listen", f"unix:{tmp_path / 's.sock'}",
                     "--testing-durable-image", str(tmp_path / "img"))
    assert "durable image" in one_error_line(res)
    assert not (tmp_path / "elsewhere.img").exists()


@pytest.mark.parametrize("command", ["info", "serve"])
def test_an_empty_region_file_is_told_it_is_empty(tmp_path: Path, command: str) -> None:
    """It was told the filesystem may not support shared writable mappings (mmap's EINVAL)."""
    empty = tmp_path / "empty.img"
    empty.touch()
    args = ([] if command == "info" else
            ["--transport", "tcp", "--listen", f"unix:{tmp_path / 's.sock'}"])
    res = pmemblk(command, str(empty), *args, check=False)
    line = one_error_line(res)
    assert "is empty (0 bytes)" in line and "shared writable" not in line, line
    assert sorted(os.listdir(tmp_path)) == ["empty.img"] and empty.stat().st_size == 0


# -- testing-power-cut: the image on a read-only place, the tracer helper's record ------------


@pytest.fixture
def cut_ready(region: str, tmp_path: Path) -> Path:
    """A durable image made by a serve that has stopped (so testing-power-cut may run)."""
    image = tmp_path / "durable.img"
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--testing-durable-image",
                    str(image), transport="tcp").start()
    target.stop()
    assert image.stat().st_size == Path(region).stat().st_size
    return image


@needs_root
def test_a_power_cut_with_the_image_on_a_read_only_place_is_one_line(
        region: str, cut_ready: Path, tmp_path: Path) -> None:
    """It was a traceback (EROFS from the image's open)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=80m,mode=0755", "tmpfs", str(mnt))
    try:
        image = mnt / "durable.img"
        image.write_bytes(cut_ready.read_bytes())
        run("mount", "-o", "remount,ro", str(mnt))
        before = digest(region)
        res = pmemblk("testing-power-cut", region, "--durable-image", str(image), check=False)
        assert "cannot open durable image" in one_error_line(res), res.stderr
        assert digest(region) == before
    finally:
        run("umount", str(mnt))


SIDECARS = {
    "torn": b'{"pid": 1, "ins',
    "a list": b"[1, 2]",
    "pid a list": b'{"pid": [1], "instance": "/x", "group": "g", "base": 0}',
    "instance a number": b'{"pid": 1, "instance": 5, "group": "g", "base": 0}',
    "no group": b'{"pid": 1, "instance": "/x", "base": 0}',
}


@pytest.mark.parametrize("how", SIDECARS)
def test_a_damaged_tracer_record_is_one_line_and_changes_nothing(
        region: str, cut_ready: Path, how: str) -> None:
    """Each was a traceback (JSONDecodeError, TypeError, KeyError)."""
    Path(f"{cut_ready}.native").write_bytes(SIDECARS[how])
    before = digest(region), digest(str(cut_ready))
    res = pmemblk("testing-power-cut", region, "--durable-image", str(cut_ready), check=False)
    assert "the flush tracer's record" in one_error_line(res)
    assert (digest(region), digest(str(cut_ready))) == before


FAKE_HELPER = "import time\ntime.sleep(120)\n"


def names_img(cmdline: Path) -> Callable[[], bool]:
    return lambda: b"img" in cmdline.read_bytes()


def test_a_tracer_record_naming_another_process_does_not_stop_it(
        region: str, cut_ready: Path, tmp_path: Path) -> None:
    """A record left by a helper that died names a PID that may be another process's by
    now: it was sent SIGTERM. Only a process that is the image's helper (``python -m
    pmemblk.powercut REGION IMAGE BASE``, its IMAGE the same file) is stopped."""
    fake = tmp_path / "fake"
    (fake / "pmemblk").mkdir(parents=True)
    (fake / "pmemblk" / "__init__.py").write_text("")
    (fake / "pmemblk" / "powercut.py").write_text(FAKE_HELPER)
    os.link(cut_ready, fake / "img")  # the same file, named relative to the helper's cwd
    (fake / "other.img").write_bytes(b"")
    # not the helper: the same arguments but not -m pmemblk.powercut; a helper of another image
    other = subprocess.Popen([PY, "-c", FAKE_HELPER, region, "img", "0"], cwd=fake)
    theirs = subprocess.Popen([PY, "-m", "pmemblk.powercut", region, "other.img", "0"],
                              cwd=fake)
    helper = subprocess.Popen([PY, "-m", "pmemblk.powercut", region, "img", "0"], cwd=fake)
    sidecar = Path(f"{cut_ready}.native")
    record = {"instance": str(tmp_path / "no-instance"), "group": "pmemblk_audit_none",
              "base": 0}
    try:
        for pid in (other.pid, theirs.pid, helper.pid):
            wait_until(names_img(Path(f"/proc/{pid}/cmdline")), "the fake processes")
        for proc in (other, theirs):
            sidecar.write_text(json.dumps({"pid": proc.pid, **record}))
            pmemblk("testing-power-cut", region, "--durable-image", str(cut_ready))
            assert proc.poll() is None, "testing-power-cut stopped a process not its helper"
        sidecar.write_text(json.dumps({"pid": helper.pid, **record}))
        pmemblk("testing-power-cut", region, "--durable-image", str(cut_ready))
        assert helper.wait(60) == -signal.SIGTERM
        assert not sidecar.exists()
    finally:
        for proc in (other, theirs, helper):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


# -- attach's records: a FIFO where a record or pid file should be --------------------------


@pytest.fixture
def tcp_target(region: str, tmp_path: Path) -> Iterator[Target]:
    t = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()
    yield t
    t.stop()


@needs_nbdkit
@pytest.mark.parametrize("record", ["nbdkit.pid", "attach.json"])
def test_a_fifo_in_place_of_a_record_does_not_hang_list_or_status(
        tcp_target: Target, run_dir: Path, record: str) -> None:
    """list, status and detach opened it to read and waited for a writer for ever."""
    pmemblk("attach", tcp_target.listen, "--no-device", "--name", "f0")
    path = run_dir / "f0" / record
    saved = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    try:
        listed = run(PY, "-m", "pmemblk", "list", timeout=30)
        row = next(line for line in listed.stdout.splitlines() if line.startswith("f0 "))
        res = run(PY, "-m", "pmemblk", "status", "f0", timeout=30, check=False)
        if record == "attach.json":
            assert "broken" in row and "not a regular file" in row, row
            assert "is broken" in one_error_line(res)
        else:
            assert "nbdkit is not running" in row, row
            assert res.returncode == 0 and "nbdkit is not running" in res.stdout
    finally:
        path.unlink()
        path.write_bytes(saved)
    pmemblk("detach", "f0")
    assert our_nbdkits(run_dir) == []
