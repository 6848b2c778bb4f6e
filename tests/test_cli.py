from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmemblk.cli import main
from pmemblk.errors import ConfigError
from pmemblk.units import parse_size


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pmemblk", *args], capture_output=True,
                          text=True, timeout=60)


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == parse_size("64MiB") == 64 << 20
    assert parse_size("1g") == 1 << 30
    for bad in ("", "1.5G", "-1", "12Q", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_create_info_and_no_silent_reformat(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "r.img")
    assert main(["create", path, "--size", "8M", "--block-size", "512"]) == 0
    assert "blocks of 512 bytes" in capsys.readouterr().out
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data_size"] == (8 << 20) - 4096 and info["block_size"] == 512
    assert info["clean_shutdown"] is True and info["is_pmem"] is False
    uuid1 = info["uuid"]
    assert main(["create", path, "--size", "8M"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["create", path, "--size", "4M", "--force"]) == 0
    assert os.path.getsize(path) == 4 << 20
    capsys.readouterr()
    main(["info", path, "--json"])
    assert json.loads(capsys.readouterr().out)["uuid"] != uuid1


def test_create_atomic_blocks_and_info_reports_them(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "a.img")
    assert main(["create", path, "--size", "8M", "--atomic-blocks", "--block-size", "512",
                 "--lanes", "16"]) == 0
    assert "sectors of 512 bytes, 16 lanes" in capsys.readouterr().out
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["atomic_blocks"] is True and info["layout_version"] == 2
    assert info["sector_size"] == 512 and info["lanes"] == 16
    assert 0 < info["export_size"] < info["data_size"] and info["export_size"] % 512 == 0
    assert main(["create", path, "--force"]) == 0  # plain again: version 1
    capsys.readouterr()
    main(["info", path, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["atomic_blocks"] is False and info["layout_version"] == 1


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff" * 65536)
    open_secret = tmp_path / "open-secret"
    open_secret.write_text("x" * 32)
    open_secret.chmod(0o644)
    short_secret = tmp_path / "short-secret"
    short_secret.write_text("tooshort\n")
    short_secret.chmod(0o600)
    insecure = "--insecure-no-auth"
    cases = [
        (["info", str(junk)], "no pmemblk header"),
        (["info", str(tmp_path / "missing")], "no such file"),
        (["create", str(tmp_path / "n.img")], "--size"),
        (["create", str(tmp_path / "n.img"), "--size", "10X"], "not a number"),
        (["create", str(tmp_path / "n.img"), "--size", "1M", "--block-size", "1000"],
         "block size 1000"),
        (["create", str(tmp_path / "n.img"), "--size", "4K"], "too small"),
        (["serve", str(junk), "--listen", "127.0.0.1:7000"], "loopback"),
        (["serve", str(junk), "--listen", "0.0.0.0:7000", insecure], "wildcard"),
        (["serve", str(junk), "--listen", "0.0.0.0:7000"], "reachable from other hosts"),
        (["serve", str(junk), "--listen", "192.0.2.1:7000"], "--insecure-no-auth"),
        (["serve", str(junk), "--listen", "192.0.2.1:7000", "--secret-file",
          str(open_secret)], "chmod 600"),
        (["serve", str(junk), "--listen", "192.0.2.1:7000", "--secret-file",
          str(short_secret)], "at least 16"),
        (["serve", str(junk), "--listen", "192.0.2.1:7000", "--secret-file",
          str(tmp_path / "nope")], "No such file"),
        (["secret", str(open_secret)], "already exists"),
        (["serve", str(junk), "--listen", "nocolon"], "HOST:PORT"),
        (["create", str(tmp_path / "n.img"), "--size", "1M", "--lanes", "8"],
         "--atomic-blocks regions only"),
        (["create", str(tmp_path / "n.img"), "--size", "1M", "--atomic-blocks", "--lanes", "0"],
         "--lanes 0 is out of range"),
        (["create", str(tmp_path / "n.img"), "--size", "1M", "--atomic-blocks", "--block-size",
          "1024"], "--block-size 512 or 4096"),
        (["create", str(tmp_path / "n.img"), "--size", "64K", "--atomic-blocks"], "too small"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 1, (args, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert junk.read_bytes() == b"\xff" * 65536  # nothing was reformatted


def test_serve_refuses_a_region_without_header(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(65536))
    res = run("serve", str(junk), "--listen", "192.0.2.1:7000", "--insecure-no-auth")
    assert res.returncode == 1
    assert "pmemblk create" in res.stderr and "Traceback" not in res.stderr
    assert junk.read_bytes() == bytes(65536)


def test_secret_command_writes_a_private_random_secret(tmp_path: Path) -> None:
    from pmemblk.auth import load_secret

    a, b = tmp_path / "a", tmp_path / "b"
    assert run("secret", str(a)).returncode == 0
    assert run("secret", str(b)).returncode == 0
    assert a.stat().st_mode & 0o777 == 0o600
    assert len(load_secret(str(a))) == 64 and load_secret(str(a)) != load_secret(str(b))


def test_create_of_a_big_region_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, allocating a GiB or more draws a progress bar; piped, it stays quiet."""
    import pty

    path = tmp_path / "big.img"
    pid, fd = pty.fork()
    if pid == 0:  # the child: pmemblk on the pty
        os.execv(sys.executable, [sys.executable, "-m", "pmemblk", "create", str(path),
                                  "--size", "1G"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert f"allocating {path}" in text and "1.00G" in text, text  # tqdm: done/total
    path.unlink()
    piped = run("create", str(path), "--size", "1G")
    assert piped.returncode == 0 and "allocating" not in piped.stderr, piped.stderr
