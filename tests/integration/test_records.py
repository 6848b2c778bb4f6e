"""Attach state pmemblk can always get out of (issue 24, item 6): a torn or wrongly typed
attach.json, or a folder a detach left because it held someone else's file, is listed as
broken with its folder, and ``detach NAME`` stops what is provably its own and says what it
left. It used to be "nothing attached" (or a traceback) from list, "no such attachment" from
detach and "exists already" from attach, with the nbdkit running and unreachable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ..procs import Target, our_nbdkits, pmemblk
from .conftest import needs_nbdkit
from .test_daytwo import one_line

pytestmark = needs_nbdkit


@pytest.fixture
def target(region: str, tmp_path: Path) -> Target:
    return Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()


def torn(record: Path) -> None:
    record.write_bytes(record.read_bytes()[:37])


def retyped(**fields: object) -> Callable[[Path], None]:
    def damage(record: Path) -> None:
        value = json.loads(record.read_text())
        value.update(fields)
        record.write_text(json.dumps(value))
    return damage


def written(data: bytes) -> Callable[[Path], None]:
    def damage(record: Path) -> None:
        record.write_bytes(data)
    return damage


DAMAGE: dict[str, Callable[[Path], None]] = {
    "torn": torn,
    "empty": written(b""),
    "a list": written(b"[1, 2]"),
    "connections a string": retyped(connections="4"),
    "keys a number": retyped(keys=5),
    "device a number": retyped(device=7),
    "readonly a number": retyped(readonly=1),
    "an unknown field": retyped(owner="x"),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_record_is_listed_as_broken_and_detach_stops_its_nbdkit(
        target: Target, run_dir: Path, how: str) -> None:
    pmemblk("attach", target.listen, "--no-device", "--name", "d0")
    (pid,) = our_nbdkits(run_dir)
    DAMAGE[how](run_dir / "d0" / "attach.json")
    listed = pmemblk("list")
    assert "Traceback" not in listed.stderr and "nothing attached" not in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith("d0 "))
    assert "broken" in row and str(run_dir / "d0") in row and "pmemblk detach d0" in row, row
    (entry,) = json.loads(pmemblk("list", "--json").stdout)
    assert entry["name"] == "d0" and entry["state"].startswith("broken: ")
    assert "is broken" in one_line(pmemblk("status", "d0", check=False))
    assert "exists already" in one_line(pmemblk("attach", target.listen, "--no-device",
                                                "--name", "d0", check=False))
    res = pmemblk("detach", "d0")
    assert "detached broken attachment d0" in res.stdout and "Traceback" not in res.stderr
    assert our_nbdkits(run_dir) == [] and not (run_dir / "d0").exists(), pid
    assert pmemblk("list").stdout.strip() == "nothing attached"


def test_a_folder_left_for_a_foreign_file_is_listed_and_detach_says_what_it_left(
        target: Target, run_dir: Path) -> None:
    pmemblk("attach", target.listen, "--no-device", "--name", "d1")
    foreign = run_dir / "d1" / "notes.txt"
    foreign.write_text("mine\n")
    pmemblk("detach", "d1")
    assert our_nbdkits(run_dir) == [] and foreign.read_text() == "mine\n"
    row = pmemblk("list").stdout.splitlines()[-1]
    assert row.startswith("d1 ") and "broken: no record; it holds notes.txt" in row, row
    res = pmemblk("detach", "d1")
    assert "left " in res.stderr and "notes.txt" in res.stderr and foreign.exists()
    foreign.unlink()
    pmemblk("detach", "d1")
    assert not (run_dir / "d1").exists()
    pmemblk("attach", target.listen, "--no-device", "--name", "d1")  # the name is free again
    pmemblk("detach", "d1")
