"""Atomic JSON state files; a corrupt file is moved aside, never trusted, never fatal.

Design note. A state file (tasks, budget used, desired count, restart history)
must be either the old version or the new one after any crash, power loss or
full disk.  So a write goes to a temporary file in the same directory (same
filesystem, so ``rename`` is atomic), created ``O_EXCL`` with mode 0600 (state
can name tasks and agents; it is the owner's), is ``fsync``'d, renamed over the
target with ``os.replace``, and the directory is ``fsync``'d so the rename
itself is durable.  Any ``OSError`` on the way (``ENOSPC``, ``EIO``, ``EROFS``)
removes the temporary file and raises :class:`StateError`; the old file is
untouched because it was never opened for writing.

Reading is the other edge: a file truncated by a crash before this scheme
existed, edited by hand, or filled with garbage is renamed to
``<name>.corrupt-<UTC timestamp>`` (kept for a person to look at) and the
caller gets its default and one line to log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import StateError

log = logging.getLogger(__name__)

T = TypeVar("T")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically and durably.

    Raises :class:`StateError` on any I/O failure, leaving the old file as it was.
    """
    data = (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    write_bytes_atomic(Path(path), data)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; 0600; StateError on failure."""
    write_bytes_atomic(Path(path), text.encode(), durable)


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory.

    ``durable=False`` skips both fsyncs: still never a torn file, and safe against
    any process dying, but a power cut may lose the write. For files that are
    regenerated anyway (a workspace's CLAUDE.md, context.md): their fsyncs were
    most of a daemon's boot time when a hundred boot at once.
    """
    tmp, fd = _create_temp(path)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StateError(f"{path}: cannot write state: {exc.strerror or exc}") from exc
    if durable:
        _fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new, empty, 0600 file next to ``path``; never an existing one (O_EXCL)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StateError(f"{path}: cannot write state: {exc.strerror or exc}") from exc
    raise StateError(f"{path}: cannot create a temporary file")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort where the fs refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open %s to fsync it: %s", directory, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("cannot fsync %s: %s", directory, exc)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_json(path: Path, default: T, *, validate: Callable[[Any], Any] | None = None
              ) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(default, one-line warning)`` after moving a bad file aside.

    A missing file is ``(default, None)``.  ``validate`` gets the decoded value
    and returns what to use; anything it raises marks the file corrupt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return default, None
    except OSError as exc:
        return default, _set_aside(path, f"unreadable: {exc.strerror or exc}")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return default, _set_aside(path, _json_problem(data, exc))
    if validate is None:
        return value, None
    try:
        return validate(value), None
    except Exception as exc:  # noqa: BLE001 - any rejection by the validator means corrupt
        return default, _set_aside(path, f"invalid: {_one_line(exc)}")


def _json_problem(data: bytes, exc: BaseException) -> str:
    if not data.strip():
        return "empty"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"not JSON: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "\u2026"


def _set_aside(path: Path, problem: str) -> str:
    """Rename a bad state file out of the way and say so in one line."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.rename(path, target)
    except OSError as exc:
        return f"{path}: corrupt ({problem}); could not move it aside: {exc.strerror or exc}"
    _fsync_dir(path.parent)
    return f"{path}: corrupt ({problem}); moved aside to {target}"
