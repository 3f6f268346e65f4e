"""``agentctl swarm install-unit``: the systemd user unit for a pip-installed copy.

The .deb puts the unit in /usr/lib/systemd/user with ``ExecStart=/usr/bin/agentctl``.
A pip install has no such path, so this writes the same unit (shipped as package
data, ``agentctl_swarm/data/agentctl-swarm.service``, a copy of
``systemd/agentctl-swarm.service``) to the user's unit directory with
``ExecStart`` pointing at this very interpreter: ``<sys.executable> -m
agentctl_swarm.cli swarm start``.  ``sys.executable`` is kept as is, not
resolved: in a venv it is a symlink, and only the symlinked path finds the
venv's site-packages.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import suppress
from importlib import resources
from pathlib import Path

from .errors import SwarmError

UNIT_NAME = "agentctl-swarm.service"
_EXEC_START = re.compile(r"^ExecStart=.*$", re.MULTILINE)
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")


class UnitInstallError(SwarmError):
    """The unit file could not be written, or would overwrite a different one."""


def packaged_unit_text() -> str:
    """The user unit as shipped in the package."""
    source = resources.files("agentctl_swarm").joinpath("data", UNIT_NAME)
    try:
        return source.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnitInstallError(f"the packaged unit {source} is unreadable ({exc.strerror or exc}); "
                               "is agentctl-swarm installed with its package data?") from exc


def user_unit_dir(environ: dict[str, str] | None = None) -> Path:
    """Where ``systemctl --user`` finds a user's own units ($XDG_CONFIG_HOME honoured)."""
    env = os.environ if environ is None else environ
    config = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def unit_word(word: str) -> str:
    """One argument as systemd reads it in ``ExecStart=``: ``%`` escaped, quoted if needed."""
    word = word.replace("%", "%%")
    if _NEEDS_QUOTES.search(word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def unit_text(python: str | None = None) -> str:
    """The packaged unit with ``ExecStart`` running ``python -m agentctl_swarm.cli``."""
    argv = [python or sys.executable, "-m", "agentctl_swarm.cli", "swarm", "start"]
    line = "ExecStart=" + " ".join(unit_word(w) for w in argv)
    text, count = _EXEC_START.subn(lambda _: line, packaged_unit_text())
    if count != 1:
        raise UnitInstallError(f"the packaged {UNIT_NAME} has {count} ExecStart= lines, expected 1")
    return text


def install_user_unit(force: bool = False, *, directory: Path | None = None,
                      python: str | None = None) -> Path:
    """Write the user unit; refuse to replace a different existing file unless ``force``.

    Writing the same content again is fine (idempotent).  The file is written
    to a temporary name and renamed, so systemd never reads half a unit.
    """
    target = (directory or user_unit_dir()) / UNIT_NAME
    text = unit_text(python)
    partial = target.with_name(f".{UNIT_NAME}.{os.getpid()}.tmp")
    try:
        if target.exists() and not force and target.read_text(encoding="utf-8") != text:
            raise UnitInstallError(f"{target} exists and differs; use --force to overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except OSError as exc:
        with suppress(OSError):
            partial.unlink()
        raise UnitInstallError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target
