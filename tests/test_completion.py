"""Bash completion: pmemblk offers its subcommands, options and choices (argcomplete), and the
shipped completion file wires bash to it."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pmemblk.cli import build_parser

from .conftest import ROOT

COMPLETION = ROOT / "pmemblk" / "completion" / "pmemblk"


def complete(line: str, tmp_path: Path) -> list[str]:
    """What pmemblk offers for the word at the end of ``line`` (argcomplete's protocol, as
    bash's completion function drives it)."""
    out = tmp_path / "completions"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_ARGCOMPLETE": "1", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
           "_ARGCOMPLETE_IFS": "\n"}
    res = subprocess.run([sys.executable, "-m", "pmemblk"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return [w.strip() for w in out.read_text().split("\n") if w.strip()]


def subcommands() -> list[str]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subs.choices)


def test_offers_every_subcommand(tmp_path: Path) -> None:
    offered = complete("pmemblk ", tmp_path)
    assert set(subcommands()) <= set(offered)
    assert "attach" in offered and "status" in offered
    assert complete("pmemblk st", tmp_path) == ["status"]


def test_offers_options_and_their_choices(tmp_path: Path) -> None:
    assert complete("pmemblk attach --fl", tmp_path) == ["--flush"]
    assert set(complete("pmemblk attach --flush ", tmp_path)) == {"auto", "native", "gpspm",
                                                                  "apm"}
    assert "--mandir" in complete("pmemblk install-plugin --", tmp_path)


@pytest.mark.skipif(shutil.which("register-python-argcomplete") is None,
                    reason="register-python-argcomplete is not installed (python3-argcomplete)")
def test_the_shipped_file_completes_in_bash(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pmemblk"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m pmemblk "$@"\n')
    wrapper.chmod(0o755)
    script = f"""
source {COMPLETION}
fn=$(complete -p pmemblk | sed 's/.* -F \\([^ ]*\\) .*/\\1/')
COMP_LINE="pmemblk de"; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=(pmemblk de); COMP_CWORD=1
COMP_TYPE=9
"$fn" pmemblk de pmemblk
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert [w.strip() for w in res.stdout.split()] == ["detach"]
