"""The man pages, made from what they describe so they cannot drift: pmemblk(8) from the
command's argument parser (by argparse-manpage), nbdkit-pmemblk-plugin(1) from the plugin's key
table (plugin_instance.KEY_TABLE).

They are checked in under ``pmemblk/man/`` (package data, and ``share/man`` for pip), so an
install needs no generator; tests/test_manpages.py regenerates them and fails when the
checked-in ones differ. After changing an option or a key::

    PYTHONPATH=$PWD .venv/bin/python -m pmemblk.manpages     # rewrites pmemblk/man/*
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from . import __version__
from .plugin_instance import KEY_TABLE

#: Where the checked-in pages live, and the name each is installed under.
MAN_DIR = Path(__file__).parent / "man"
PAGES = {"pmemblk.8": "8", "nbdkit-pmemblk-plugin.1": "1"}


def roff(text: str) -> str:
    """Plain text as roff body text: backslashes and hyphens escaped, no line read as a
    request (a leading '.' or ')."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.splitlines())


SEE_ALSO = ("nbdkit(1), nbdkit-python-plugin(3), nbd-client(8), daxctl(1), "
            "and docs/pmemblk.md, docs/persistence.md, docs/security.md, docs/services.md in "
            "the pmemblk source")


#: The width argparse formats usage lines to in pmemblk(8).
WIDTH = 80


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and its subcommands' parsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for a in subs for p in a.choices.values())]


def pmemblk_page() -> str:
    """pmemblk(8), roff, from cli.build_parser()."""
    from argparse_manpage.manpage import Manpage

    from .cli import build_parser

    parser = build_parser()
    parser.description = None  # the DESCRIPTION section below says more
    # argparse wraps usage to the terminal's width ($COLUMNS): the page must not depend on it.
    for each in parsers(parser):
        each.formatter_class = functools.partial(argparse.HelpFormatter, width=WIDTH)
    page = Manpage(parser, {"project_name": "pmemblk", "version": __version__,
                            "manual_section": 8, "manual_title": "System Administration",
                            "description": "remote persistent memory as a Linux block device"},
                   format="single-commands-section")
    page.date = ""  # reproducible: the page changes only when what it says changes
    sections = {
        "description": roff(
            "pmemblk exports a region of persistent memory (a devdax device or a file) from "
            "one host with pmemblk serve, and makes it a block device on another with pmemblk "
            "attach (nbdkit with the pmemblk plugin, and the kernel's NBD client). A FLUSH "
            "that pmemblk acknowledges is persistent on the target, or the flush method says "
            "it gives visibility only (docs/persistence.md).") + "\n.PP\n" + roff(
            "Every subcommand and its options follow; pmemblk COMMAND --help says the same."),
        "exit status": roff(
            "0 success; 1 a pmemblk error (one line on stderr that says what to do); 2 bad "
            "usage; 130 interrupted. Tracebacks only with --debug."),
        "environment": ".TP\n.B PMEMBLK_RUN_DIR\n" + roff(
            "where attach keeps its state, like --run-dir (default /run/pmemblk)"),
        "files": ".TP\n.I /run/pmemblk/NAME/\n" + roff(
            "one attachment: its nbdkit's pid file, control socket and log") +
            "\n.TP\n.I /etc/systemd/system/pmemblk-serve@.service\n" + roff(
            "written by pmemblk install-units, with pmemblk-attach@.service"),
        "see also": roff("nbdkit-pmemblk-plugin(1), " + SEE_ALSO),
    }
    for heading, content in sections.items():
        page.add_section(heading, "=", content)
    text = str(page)
    # argparse-manpage heads the subcommands with their argparse group's title; a subcommand's
    # usage is preformatted (as --help prints it), not filled.
    assert "\n.SH\nPOSITIONAL ARGUMENTS\n" in text
    text = text.replace("\n.SH\nPOSITIONAL ARGUMENTS\n", "\n.SH COMMANDS\n")
    return re.sub(r"\nusage: (.*?)\n\n", "\n.nf\nusage: \\1\n.fi\n\n", text, flags=re.DOTALL)


def plugin_page() -> str:
    """nbdkit-pmemblk-plugin(1), roff, from the plugin's key table."""
    lines = [
        f'.TH NBDKIT\\-PMEMBLK\\-PLUGIN "1" "" "pmemblk {__version__}" "nbdkit plugins"',
        ".SH NAME",
        "nbdkit\\-pmemblk\\-plugin \\- a pmemblk target's region as an NBD export",
        ".SH SYNOPSIS",
        ".B nbdkit pmemblk",
        "\\fBtarget=\\fR\\fIHOST:PORT\\fR|\\fBunix:\\fR\\fIPATH\\fR "
        "[\\fIKEY\\fR\\fB=\\fR\\fIVALUE\\fR ...]",
        ".br",
        ".B nbdkit python plugin/pmemblk.py",
        "\\fBtarget=\\fR... [\\fIKEY\\fR\\fB=\\fR\\fIVALUE\\fR ...] (from a checkout)",
        ".SH DESCRIPTION",
        roff("The pmemblk plugin makes nbdkit an NBD server for a region that pmemblk serve "
             "exports over RDMA verbs or TCP. One nbdkit process is one client of the target: "
             "its NBD connections share one set of connections to the target, so a FLUSH on "
             "any of them makes every completed write persistent (multi-conn). "
             "pmemblk install-plugin puts it where nbdkit finds it by the name pmemblk; "
             "pmemblk attach runs it for you."),
        ".SH PARAMETERS",
        roff("An unknown key, a key given twice or a bad value stops nbdkit with a one-line "
             "error."),
    ]
    for key in KEY_TABLE:
        lines += [".TP", f"\\fB{roff(key.name)}=\\fR\\fI{roff(key.value)}\\fR", roff(key.help)]
    lines += [
        ".SH EXAMPLES",
        ".nf",
        roff("nbdkit -U /run/pmemblk.sock pmemblk target=192.0.2.1:7000 "
             "secret-file=/etc/pmemblk.secret\n"
             "nbdkit -U - pmemblk target=unix:/run/pmemblk-target.sock --run 'nbdinfo \"$uri\"'\n"
             "nbdkit pmemblk --dump-plugin"),
        ".fi",
        ".SH SEE ALSO",
        roff("pmemblk(8), " + SEE_ALSO + ", docs/nbdkit-plugin.md"),
        "",
    ]
    return "\n".join(lines)


def render(name: str) -> str:
    if name == "pmemblk.8":
        return pmemblk_page()
    if name == "nbdkit-pmemblk-plugin.1":
        return plugin_page()
    raise KeyError(name)


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else MAN_DIR
    for name in PAGES:
        (folder / name).write_text(render(name))
        print(f"wrote {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
