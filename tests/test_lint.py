"""ruff and mypy are part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/setup installs it)")
    return found


def test_ruff() -> None:
    res = subprocess.run([tool("ruff"), "check", "pmemblk", "plugin", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy() -> None:
    res = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_plugin(tmp_path: Path) -> None:
    # plugin/pmemblk.py is named like the package it imports: check a copy under another name.
    copy = tmp_path / "pmemblk_nbdkit_plugin.py"
    shutil.copy(ROOT / "plugin" / "pmemblk.py", copy)
    res = subprocess.run([tool("mypy"), "--strict", "--ignore-missing-imports", str(copy)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_vm_test_file_runs_in_a_flavour() -> None:
    """scripts/test runs a list of VM test files per flavour: a new file in neither list would
    never run in CI."""
    import re

    script = (ROOT / "scripts" / "test").read_text()
    listed: set[str] = set()
    for name in ("STABLE_TESTS", "CURRENT_TESTS"):
        match = re.search(rf"^{name}=\((.*?)\)", script, re.S | re.M)
        assert match, f"scripts/test has no {name}"
        listed |= {x.strip('"').split("::")[0] for x in match.group(1).split()}
    files = {p.name for p in (ROOT / "tests" / "vm").glob("test_*.py")}
    assert files <= listed, f"in no flavour's list: {sorted(files - listed)}"
    assert listed <= files, f"listed but missing: {sorted(listed - files)}"


def test_the_tests_left_to_vm_all_exist() -> None:
    """scripts/test deselects VM_ALL_ONLY from its default run; pytest ignores a --deselect
    that names nothing, so a renamed test would run by default again unnoticed."""
    import re

    script = (ROOT / "scripts" / "test").read_text()
    match = re.search(r"^VM_ALL_ONLY=\((.*?)\)", script, re.S | re.M)
    assert match, "scripts/test has no VM_ALL_ONLY"
    for node in (x.strip('"') for x in match.group(1).split()):
        path, _, name = node.partition("::")
        function = name.split("[")[0]
        source = (ROOT / "tests" / "vm" / path).read_text()
        assert f"def {function}(" in source, f"{node}: no such test"
