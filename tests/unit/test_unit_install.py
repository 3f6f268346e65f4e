"""``agentctl swarm install-unit``: the packaged unit, rewritten for this interpreter."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentctl_swarm.unit import (UNIT_NAME, UnitInstallError, install_user_unit, packaged_unit_text,
                                 unit_text, unit_word, user_unit_dir)

CHECKOUT = Path(__file__).resolve().parents[2]


def exec_start(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("ExecStart=")


def test_packaged_copy_matches_systemd_dir() -> None:
    """agentctl_swarm/data holds a copy of systemd/agentctl-swarm.service; they must not drift."""
    assert packaged_unit_text() == (CHECKOUT / "systemd" / UNIT_NAME).read_text()


def test_exec_start_runs_this_interpreter_and_nothing_else_changes() -> None:
    text = unit_text()
    assert exec_start(text) == f"{sys.executable} -m agentctl_swarm.cli swarm start"
    packaged = packaged_unit_text().splitlines()
    rewritten = text.splitlines()
    assert len(packaged) == len(rewritten)
    assert [a for a, b in zip(packaged, rewritten) if a != b] == ["ExecStart=/usr/bin/agentctl swarm start"]


def test_odd_interpreter_paths_are_quoted_for_systemd() -> None:
    assert unit_word("/opt/venv/bin/python") == "/opt/venv/bin/python"
    assert unit_word("/opt/my venv/bin/python") == '"/opt/my venv/bin/python"'
    assert unit_word("/opt/100%/python") == "/opt/100%%/python"
    assert exec_start(unit_text('/a "b"/python')) == r'"/a \"b\"/python" -m agentctl_swarm.cli swarm start'


def test_install_writes_the_unit_and_is_idempotent(tmp_path: Path) -> None:
    path = install_user_unit(directory=tmp_path / "systemd" / "user")
    assert path == tmp_path / "systemd" / "user" / UNIT_NAME
    assert path.read_text() == unit_text()
    assert path.stat().st_mode & 0o777 == 0o644
    assert install_user_unit(directory=path.parent) == path  # same content: no complaint
    assert sorted(p.name for p in path.parent.iterdir()) == [UNIT_NAME]


def test_refuses_to_overwrite_a_different_unit_without_force(tmp_path: Path) -> None:
    path = tmp_path / UNIT_NAME
    path.write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(UnitInstallError, match="exists and differs; use --force") as caught:
        install_user_unit(directory=tmp_path)
    assert "\n" not in str(caught.value)
    assert path.read_text() == "[Service]\nExecStart=/bin/true\n"
    install_user_unit(force=True, directory=tmp_path)
    assert path.read_text() == unit_text()


def test_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UnitInstallError, match=r"cannot write .*agentctl-swarm.service"):
        install_user_unit(directory=blocker / "sub")


def test_user_unit_dir_honours_xdg_config_home(tmp_path: Path) -> None:
    assert user_unit_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "systemd" / "user"
    assert user_unit_dir({}) == Path.home() / ".config" / "systemd" / "user"


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"} | {"HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "agentctl_swarm.cli", "swarm", "install-unit", *args],
                          env=env, capture_output=True, text=True, timeout=30)


def test_cli_installs_refuses_and_forces(tmp_path: Path) -> None:
    target = tmp_path / ".config" / "systemd" / "user" / UNIT_NAME
    done = _cli(tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout
    target.write_text(target.read_text() + "# edited\n")
    refused = _cli(tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"agentctl: {target} exists and differs; use --force to overwrite it"
    assert _cli(tmp_path, "--force").returncode == 0
    assert target.read_text() == unit_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_installed_unit_verifies(tmp_path: Path) -> None:
    """systemd itself accepts the rewritten unit (and finds the interpreter it names)."""
    path = install_user_unit(directory=tmp_path)
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(["systemd-analyze", "verify", "--user", str(path)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime),
                               "HOME": str(tmp_path)}, timeout=60)
    problems = [line for line in done.stderr.splitlines() if UNIT_NAME in line or "ExecStart" in line]
    assert done.returncode == 0 and not problems, shlex.join(done.args) + "\n" + done.stderr
