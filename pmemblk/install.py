"""Installing pmemblk's pieces where other programs look for them: the nbdkit plugin in
nbdkit's plugin directory (``nbdkit pmemblk ...``) with the man pages where ``man`` finds them,
the systemd units in /etc/systemd/system.

Both are written from what is running now, so they name this pmemblk's files and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from importlib import resources

from . import __version__, commands, files
from .attach import package_root
from .errors import ConfigError, ServiceError

UNITS = ("pmemblk-serve@.service", "pmemblk-attach@.service")
PLUGIN_NAME = "nbdkit-pmemblk-plugin"
#: The checked-in man pages (pmemblk/man/, made by pmemblk.manpages), by section.
MAN_PAGES = {"pmemblk.8": "man8", "nbdkit-pmemblk-plugin.1": "man1"}
DEFAULT_MANDIR = "/usr/local/share/man"


def nbdkit_config() -> dict[str, str]:
    try:
        res = commands.run(["nbdkit", "--dump-config"], timeout=30)
    except ServiceError as exc:
        raise ConfigError(f"cannot ask nbdkit where its plugins go ({exc}): is nbdkit "
                          "installed? (apt install nbdkit nbdkit-plugin-python)") from None
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def _system_python_finds_us() -> bool:
    """Whether nbdkit's Python (Debian's /usr/bin/python3) imports this very pmemblk."""
    probe = "import importlib.util as u; s = u.find_spec('pmemblk'); print(s and s.origin)"
    with contextlib.suppress(ServiceError):
        res = commands.run(["/usr/bin/python3", "-c", probe], timeout=30, check=False,
                           env={"PATH": "/usr/bin:/bin"}, cwd="/")
        found = res.stdout.strip()
        return found != "None" and os.path.exists(found) and os.path.samefile(
            os.path.dirname(found), os.path.join(package_root(), "pmemblk"))
    return False


def plugin_script(nbdkit: str) -> str:
    lines = [f"#!{nbdkit} python",
             f"# pmemblk {__version__}'s nbdkit plugin, installed by `pmemblk install-plugin`.",
             "# Usage: nbdkit pmemblk target=HOST:PORT|unix:PATH [key=value ...]; "
             "nbdkit pmemblk --dump-plugin"]
    if not _system_python_finds_us():
        # pmemblk lives where nbdkit's Python does not look (a venv): say where.
        lines += ["import sys", f"sys.path.insert(0, {package_root()!r})"]
    lines.append("from pmemblk.nbdkit_plugin import *  # noqa: F403")
    return "\n".join(lines) + "\n"


def install_plugin(plugindir: str | None) -> str:
    config = nbdkit_config()
    folder = plugindir or config.get("plugindir")
    if not folder:
        raise ConfigError("nbdkit --dump-config names no plugindir: pass --plugindir")
    nbdkit = config.get("binary") or shutil.which("nbdkit") or "/usr/sbin/nbdkit"
    path = os.path.join(folder, PLUGIN_NAME)
    _write(path, plugin_script(nbdkit), 0o755)
    # Run it as nbdkit will: a plugin that cannot load is removed, not left to fail later.
    try:
        res = commands.run([path, "--dump-plugin"], timeout=60, check=False)
        said = commands.said(res)
        loaded = res.returncode == 0 and f"pmemblk_version={__version__}" in res.stdout
    except ServiceError as exc:
        said, loaded = str(exc), False
    if not loaded:
        os.unlink(path)
        raise ConfigError(f"the installed plugin did not load under nbdkit ({said}); "
                          f"removed {path}")
    return path


def check_mandir(mandir: str) -> None:
    """Refuse a man directory that is missing or that others can write, before anything is
    installed."""
    files.check_folder(mandir, "man directory")


def install_man_pages(mandir: str) -> list[str]:
    """pmemblk(8) and nbdkit-pmemblk-plugin(1) under ``mandir``/man8 and /man1."""
    check_mandir(mandir)
    written = []
    for name, section in MAN_PAGES.items():
        folder = os.path.join(mandir, section)
        os.makedirs(folder, mode=0o755, exist_ok=True)
        path = os.path.join(folder, name)
        _write(path, resources.files("pmemblk").joinpath("man", name).read_text(), 0o644)
        written.append(path)
    return written


def _executable() -> str:
    """The absolute path of the running ``pmemblk`` command."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "pmemblk" and os.access(argv0, os.X_OK):
        return os.path.abspath(argv0)
    beside = os.path.join(os.path.dirname(sys.executable), "pmemblk")  # python -m pmemblk
    found = beside if os.access(beside, os.X_OK) else shutil.which("pmemblk")
    if found is None:
        raise ConfigError("cannot tell where the pmemblk command is: run install-units "
                          "through it (e.g. /usr/local/bin/pmemblk install-units)")
    return os.path.abspath(found)


def unit_text(name: str, executable: str) -> str:
    template = resources.files("pmemblk").joinpath("systemd", name).read_text()
    return template.replace("@PMEMBLK@", executable)


def install_units(unit_dir: str) -> list[str]:
    executable = _executable()
    written = []
    for name in UNITS:
        path = os.path.join(unit_dir, name)
        _write(path, unit_text(name, executable), 0o644)
        written.append(path)
    return written


def _write(path: str, text: str, mode: int) -> None:
    # Root writes here: a folder another user can write would let them plant what root runs.
    files.check_folder(os.path.dirname(os.path.abspath(path)), "install directory")
    files.write_atomic(path, text.encode(), mode)
