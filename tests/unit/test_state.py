"""Atomic state files on real filesystems, including a real full one."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentctl_swarm.errors import StateError
from agentctl_swarm.state import read_json, write_json_atomic, write_text_atomic


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != name)


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    write_json_atomic(path, {"tasks": [{"id": "t1", "state": "queued"}]})
    assert read_json(path, {}) == ({"tasks": [{"id": "t1", "state": "queued"}]}, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert leftovers(tmp_path, "tasks.json") == []


def test_write_text_atomic(tmp_path: Path) -> None:
    path = tmp_path / "CLAUDE.md"
    write_text_atomic(path, "# r\u00f4le\n")
    write_text_atomic(path, "# role\n")
    assert path.read_text() == "# role\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert leftovers(tmp_path, "CLAUDE.md") == []


def test_overwrite_replaces_the_inode(tmp_path: Path) -> None:
    """Readers holding the old file keep a complete old version (rename, not rewrite)."""
    path = tmp_path / "budget.json"
    write_json_atomic(path, {"used": 1})
    with open(path) as old:
        write_json_atomic(path, {"used": 2})
        assert json.load(old) == {"used": 1}
    assert read_json(path, None)[0] == {"used": 2}


def test_missing_file_is_the_default_without_warning(tmp_path: Path) -> None:
    default: dict[str, int] = {"x": 1}
    value, warning = read_json(tmp_path / "nope.json", default)
    assert value is default and warning is None


@pytest.mark.parametrize("content,problem", [
    (b"", "empty"),
    (b'{"tasks": [{"id": "t1", "sta', "not JSON"),
    (b"\xff\xfe garbage", "not JSON"),
    (b"[" * 100_000, "nested too deeply"),
], ids=["empty", "truncated", "binary", "deeply-nested"])
def test_corrupt_file_is_moved_aside(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "tasks.json"
    path.write_bytes(content)
    value, warning = read_json(path, {"tasks": []})
    assert value == {"tasks": []}
    assert warning is not None and "\n" not in warning
    assert warning.startswith(f"{path}: corrupt ({problem}")
    assert not path.exists()
    [aside] = leftovers(tmp_path, "tasks.json")
    assert aside.startswith("tasks.json.corrupt-") and aside in warning
    assert (tmp_path / aside).read_bytes() == content


def test_validator_rejection_moves_aside(tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    write_json_atomic(path, {"count": "many"})

    def validate(v: object) -> int:
        if not isinstance(v, dict) or not isinstance(v.get("count"), int):
            raise ValueError("count: expected an integer")
        return v["count"]

    value, warning = read_json(path, 0, validate=validate)
    assert value == 0
    assert warning and "invalid: count: expected an integer" in warning
    assert not path.exists()
    write_json_atomic(path, {"count": 4})
    assert read_json(path, 0, validate=validate) == (4, None)


def test_two_corrupt_files_in_one_second_do_not_collide(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    for _ in range(2):
        path.write_text("{")
        assert read_json(path, None)[1]
    assert len(leftovers(tmp_path, "s.json")) == 2


def test_directory_in_place_of_file_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "s.json").mkdir()
    value, warning = read_json(tmp_path / "s.json", "d")
    assert value == "d" and warning and "corrupt (unreadable" in warning


def test_write_into_missing_directory_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot write state"):
        write_json_atomic(tmp_path / "no" / "such" / "s.json", {})


def test_a_killed_writer_leaves_the_old_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of writes: the file is always one complete version."""
    path = tmp_path / "tasks.json"
    write_json_atomic(path, {"n": 0, "pad": ""})
    code = (
        "import sys; from pathlib import Path; from agentctl_swarm.state import write_json_atomic\n"
        "p = Path(sys.argv[1]); i = 0\n"
        "while True:\n"
        "    i += 1; write_json_atomic(p, {'n': i, 'pad': 'x' * 200_000})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)])
    try:
        seen, deadline = set(), time.monotonic() + 20
        while len(seen) < 20 and time.monotonic() < deadline:
            value, warning = read_json(path, None)
            assert warning is None and len(value["pad"]) in (0, 200_000)
            seen.add(value["n"])
        assert len(seen) >= 20, "the writer did not make progress"
    finally:
        child.kill()
        child.wait(timeout=10)
    value, warning = read_json(path, None)
    assert warning is None and value["n"] >= 0


# --- a real full filesystem ---------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted in the test's directory (needs root / CAP_SYS_ADMIN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(directory: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_leaves_old_file_and_no_temp(tiny_fs: Path) -> None:
    path = tiny_fs / "tasks.json"
    write_json_atomic(path, {"tasks": ["old"]})
    fill(tiny_fs)
    with pytest.raises(StateError) as info:
        write_json_atomic(path, {"tasks": ["new"] * 5000})
    assert "No space left on device" in str(info.value) and str(path) in str(info.value)
    assert read_json(path, None) == ({"tasks": ["old"]}, None)
    assert leftovers(tiny_fs, "tasks.json") == ["filler"]
    os.unlink(tiny_fs / "filler")
    write_json_atomic(path, {"tasks": ["new"]})
    assert read_json(path, None)[0] == {"tasks": ["new"]}


def test_read_only_filesystem_is_a_state_error(tiny_fs: Path) -> None:
    path = tiny_fs / "budget.json"
    write_json_atomic(path, {"used": 7})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(StateError, match="Read-only file system"):
        write_json_atomic(path, {"used": 8})
    assert read_json(path, None) == ({"used": 7}, None)
