"""The man pages: current with the parser and the key table, valid roff, and complete."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pmemblk import manpages
from pmemblk.cli import build_parser
from pmemblk.plugin_instance import KEY_TABLE

from .conftest import ROOT

needs_groff = pytest.mark.skipif(shutil.which("groff") is None,
                                 reason="groff is not installed (scripts/setup: groff-base)")


def rendered(path: Path) -> str:
    """The page as man shows it, on one very long line per paragraph: no hyphenation, no
    terminal formatting, warnings are errors."""
    res = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-rLL=2000n", "-rHY=0", "-ww",
                          str(path)], capture_output=True, text=True, timeout=60, check=True)
    assert res.stderr == "", res.stderr
    return res.stdout


@pytest.mark.parametrize("columns", ["40", "300"])
@pytest.mark.parametrize("name", list(manpages.PAGES))
def test_checked_in_pages_are_current(name: str, columns: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", columns)  # whoever regenerates, in whatever terminal
    fresh = manpages.render(name)
    assert (manpages.MAN_DIR / name).read_text() == fresh, (
        f"pmemblk/man/{name} is stale: run PYTHONPATH=$PWD .venv/bin/python -m pmemblk.manpages")


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]


@needs_groff
def test_pmemblk_8_has_every_subcommand_and_option() -> None:
    text = rendered(manpages.MAN_DIR / "pmemblk.8")
    parser = build_parser()
    for opt in options(parser):
        assert f"\n       {opt}" in text or f", {opt}" in text, opt
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert subs.choices
    for name, sub in subs.choices.items():
        section = text.split(f"\n   pmemblk {name}\n", 1)[1].split("\n   pmemblk ", 1)[0]
        for opt in options(sub):
            assert f"\n              {opt}" in section, (name, opt)
        for arg in (a for a in sub._actions if not a.option_strings):
            assert (arg.metavar or arg.dest) in section, (name, arg.dest)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n{heading}\n" in text, heading


@needs_groff
def test_plugin_1_has_every_key() -> None:
    text = rendered(manpages.MAN_DIR / "nbdkit-pmemblk-plugin.1")
    for key in KEY_TABLE:
        entry = f"\n       {key.usage}\n              {key.help}\n"
        assert entry in text, key.name


@needs_groff
def test_text_that_looks_like_roff_stays_text(tmp_path: Path) -> None:
    page = tmp_path / "t.1"
    body = manpages.roff(".SH not a heading\n'also text\nback\\slash and a-hyphen")
    page.write_text('.TH T "1" "" "" ""\n.SH NAME\n' + body + "\n")
    text = rendered(page)
    for line in (".SH not a heading", "'also text", "back\\slash and a-hyphen"):
        assert line in text


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (man-db)")
def test_man_finds_the_installed_pages(tmp_path: Path) -> None:
    from pmemblk.install import install_man_pages

    mandir = tmp_path / "man"
    mandir.mkdir()
    written = install_man_pages(str(mandir))
    assert sorted(Path(p).name for p in written) == sorted(manpages.PAGES)
    for page, section in (("pmemblk", "8"), ("nbdkit-pmemblk-plugin", "1")):
        res = subprocess.run(["man", "-M", str(mandir), "-w", section, page], capture_output=True,
                             text=True, timeout=60, check=True)
        assert res.stdout.strip() == str(mandir / f"man{section}" / f"{page}.{section}")


def test_a_wheel_installs_the_pages_completion_and_monitoring(tmp_path: Path) -> None:
    """What pip install puts where man and bash-completion look (PREFIX/share/...), and the
    package data install-plugin and docs/services.md use. (An editable install has no data
    files: there, install-plugin installs the pages.)"""
    import zipfile

    tree = tmp_path / "tree"  # what the build reads, so it writes nothing into ROOT
    shutil.copytree(ROOT / "pmemblk", tree / "pmemblk",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", str(tree), "-w", str(tmp_path / "wheel")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "wheel").glob("pmemblk-*.whl")
    names = {n.split(".data/data/", 1)[-1] for n in zipfile.ZipFile(wheel).namelist()}
    assert {"share/man/man8/pmemblk.8", "share/man/man1/nbdkit-pmemblk-plugin.1",
            "share/bash-completion/completions/pmemblk", "pmemblk/man/pmemblk.8",
            "pmemblk/man/nbdkit-pmemblk-plugin.1", "pmemblk/monitoring/pmemblk-alerts.yml",
            "pmemblk/monitoring/pmemblk-alerts.test.yml",
            "pmemblk/monitoring/pmemblk-dashboard.json"} <= names


def test_install_plugin_refuses_a_bad_mandir_before_writing_anything(tmp_path: Path) -> None:
    plugins, mandir = tmp_path / "plugins", tmp_path / "man"
    plugins.mkdir()
    mandir.mkdir(mode=0o777)
    mandir.chmod(0o777)
    for bad, message in ((tmp_path / "nope", "No such file"), (mandir, "can be written by other")):
        res = subprocess.run([sys.executable, "-m", "pmemblk", "install-plugin", "--plugindir",
                              str(plugins), "--mandir", str(bad)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 1 and message in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert list(plugins.iterdir()) == []
