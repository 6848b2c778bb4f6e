"""commands.run: every way a program pmemblk drives can fail is one ServiceError line."""

from __future__ import annotations

import sys

import pytest

from pmemblk import commands
from pmemblk.errors import ServiceError


def test_output_is_captured_and_input_is_empty() -> None:
    res = commands.run([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"],
                       timeout=30)
    assert res.returncode == 0 and res.stdout == "''\n"


def test_a_failure_names_the_command_and_what_it_said() -> None:
    code = "import sys; sys.stderr.write('first\\nthe reason\\n'); sys.exit(3)"
    with pytest.raises(ServiceError, match=r"failed \(exit status 3\): the reason$"):
        commands.run([sys.executable, "-c", code], timeout=30)
    res = commands.run([sys.executable, "-c", code], timeout=30, check=False)
    assert res.returncode == 3 and commands.said(res) == "the reason"


def test_a_missing_program_is_one_line() -> None:
    with pytest.raises(ServiceError, match="no-such-program-here is not installed"):
        commands.run(["no-such-program-here", "--x"], timeout=30)


def test_a_program_that_does_not_end_is_killed_at_its_timeout() -> None:
    with pytest.raises(ServiceError, match=r"did not finish within 0.5s"):
        commands.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
