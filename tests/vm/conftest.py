"""The VM suite: needs Soft-RoCE (rxe) and /dev/nbd*, so it runs inside scripts/vm.

On a plain host every test here is skipped with the reason; ``./scripts/test`` runs them in
one VM boot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk.rdma import rdma_devices


def _why_not() -> str | None:
    if not os.environ.get("PMEMBLK_VM"):
        return "needs RDMA (rxe) and /dev/nbd*: runs in the VM suite (./scripts/test runs it)"
    if not rdma_devices():
        return "no RDMA device (rdma_rxe not set up)"
    if not Path("/dev/nbd0").exists():
        return "no /dev/nbd0 (nbd module not loaded)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    if reason and os.environ.get("PMEMBLK_VM_REQUIRE"):
        raise pytest.UsageError(f"the VM suite cannot run: {reason}")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def shm_region(tmp_path: Path) -> Iterator[Path]:
    """A region file on /dev/shm (the VM's host share is 9p, which libpmem cannot map)."""
    path = Path("/dev/shm") / f"pmemblk-{tmp_path.name}.img"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def run_dir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``pmemblk attach``'s state folder, private to the test; attachments left by a failing
    test are detached."""
    from ..procs import pmemblk

    folder = workdir / "run"
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(folder))
    yield folder
    for att in folder.glob("*/attach.json"):  # a failed test still frees its device
        pmemblk("detach", "--force", att.parent.name, check=False)
