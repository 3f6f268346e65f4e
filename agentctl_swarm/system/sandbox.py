"""Kernel-enforced filesystem confinement of agent sessions (Landlock or bubblewrap).

Design note
-----------
*Landlock* (Linux >= 5.13) is an unprivileged LSM: a process builds a ruleset
("these access rights are handled; these paths get these rights") and calls
``landlock_restrict_self``. From then on the process and everything it forks or
execs is confined; a domain can only be narrowed, never lifted, not even by
root. ``apply_landlock`` runs in the child between fork and exec, after the
child has dropped to its final uid (``no_new_privs`` is set first, which also
makes set-uid binaries inert inside the session).

- Rules attach to inodes, and the kernel checks the *resolved* object: a
  symlink in the workspace that points at ``~/.ssh/id_ed25519`` resolves to a
  file beneath no rule and is refused; a hard link or rename that would move a
  file into a more permissive place is refused by the REFER right (ABI >= 2).
- Descriptors opened *before* restriction keep working: Landlock checks at
  open time. Closing every descriptor not meant for the session is the
  spawner's job (``close_fds``); the escape tests check it.
- A Landlocked process cannot mount, pivot_root or create a new mount
  namespace usefully, so Claude Code's own bwrap-based Bash sandbox cannot
  nest inside a Landlock domain: leave it off (its failure mode is a warning
  and unsandboxed Bash, which is still inside our domain) or set
  ``sandbox.failIfUnavailable`` to make the agent refuse instead.
- Scopes (ABI >= 6): ``SIGNAL`` stops a session from signalling the daemon,
  the supervisor or any process outside its domain (the daemon can still
  signal *into* the session); ``ABSTRACT_UNIX_SOCKET`` stops it from
  connecting to abstract sockets created outside. Pathname Unix sockets are
  NOT covered by Landlock up to ABI 7: a same-uid session can ``connect`` to
  the control socket if it knows the path (see SECURITY.md).
- ptrace of, and ``/proc/<pid>/environ``/``mem`` of, processes outside the
  domain are refused by Landlock's ptrace hook even for the same uid.
- A session running as root keeps uid 0; to stop it from using capabilities
  (loading modules, raw sockets, reboot) ``apply_landlock`` empties the
  capability bounding set, so after exec uid 0 holds no capabilities.
- Network stays open (the agent needs the API); CPU, memory and process
  counts are the cgroup module's job; world-readable data (``/proc/<pid>/
  cmdline`` of other processes, ``/etc``) stays readable.

*bubblewrap* builds a fresh mount namespace with only the policy's paths
bound in, fresh ``/dev`` and ``/dev/shm``, and a new PID and
IPC namespace. ``/`` and an empty ``/tmp`` are read-only tmpfs, so, as
under Landlock, only the workspace and the private tmp dir (export it as
TMPDIR) are writable and nothing written elsewhere can reach the host.
``--unshare-pid`` hides every outside process and makes the
namespace's init reap and kill stragglers; ``--die-with-parent`` ties the
whole tree to the bwrap process. Consequence for signals: a TERM that
reaches the outer bwrap process kills it, and with it the namespace, at
once, so under bwrap a TERM to the session's process group has no grace
period (Landlock keeps the normal TERM -> grace -> KILL semantics).
``--new-session`` is not used: sessions get no controlling terminal (the
spawner calls setsid), so TIOCSTI injection does not apply, and keeping the
process group lets the daemon's killpg reach the inner processes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fnmatch
import functools
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class SandboxError(Exception):
    """A requested confinement cannot be applied; the message says which and why."""


class SandboxKind(str, Enum):
    LANDLOCK = "landlock"
    BWRAP = "bwrap"
    NONE = "none"


# --- Landlock UAPI (include/uapi/linux/landlock.h) ---------------------------

# The Landlock syscalls were added after the syscall tables were unified, so
# they have the same number on every architecture; the table documents which
# ones we have tested.
_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_ABI1_ALL = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6
_READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Rights that make sense on a non-directory; the kernel rejects the others.
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_NUMBERS = _SYSCALLS.get(platform.machine())  # looked up once: a daemon boot makes ~170 calls


def _syscall(index: int, *args: object) -> int:
    """Call Landlock syscall ``index`` (0 create, 1 add_rule, 2 restrict); -errno on failure."""
    if _NUMBERS is None:
        return -errno.ENOSYS
    ret = _libc.syscall(ctypes.c_long(_NUMBERS[index]), *args)
    return ret if ret >= 0 else -ctypes.get_errno()


@functools.cache
def landlock_abi() -> int:
    """The running kernel's Landlock ABI version, 0 when Landlock is absent or disabled.
    Fixed at boot (it is a kernel build and command line matter), so asked once per
    process; the fork-server's answer is inherited by every daemon."""
    ret = _syscall(0, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(ret, 0)


def handled_fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows, so that nothing is left unhandled."""
    rights = _FS_ABI1_ALL
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


# --- choosing a confinement ---------------------------------------------------

@functools.lru_cache(maxsize=8)
def _bwrap_works(bwrap: str, uid: int) -> bool:
    """Try a trivial sandbox: user namespaces may be disabled for unprivileged users."""
    try:
        run = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "true"],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("bwrap probe failed: %s", exc)
        return False
    if run.returncode != 0:
        log.info("bwrap unusable for uid %s: %s", uid, run.stderr.decode(errors="replace").strip())
    return run.returncode == 0


def bwrap_usable() -> bool:
    """True when bwrap is on PATH and can actually build a sandbox for this user."""
    bwrap = shutil.which("bwrap")
    return bwrap is not None and _bwrap_works(bwrap, os.geteuid())


def choose(requested: str) -> SandboxKind:
    """Map the config's ``sandbox:`` value to the confinement to apply.

    ``auto`` never fails: it returns NONE when nothing is available and the
    caller must warn loudly. An explicit kind that cannot be applied raises.
    """
    if requested == "off":
        return SandboxKind.NONE
    if requested == "auto":
        if landlock_abi() >= 1:
            return SandboxKind.LANDLOCK
        return SandboxKind.BWRAP if bwrap_usable() else SandboxKind.NONE
    if requested == "landlock":
        if landlock_abi() < 1:
            raise SandboxError("sandbox: landlock requested but this kernel has no Landlock "
                               "(needs Linux >= 5.13 with landlock in the lsm= list)")
        return SandboxKind.LANDLOCK
    if requested == "bwrap":
        if shutil.which("bwrap") is None:
            raise SandboxError("sandbox: bwrap requested but bwrap is not on PATH")
        if not bwrap_usable():
            raise SandboxError("sandbox: bwrap requested but it cannot create namespaces here "
                               "(unprivileged user namespaces disabled?)")
        return SandboxKind.BWRAP
    raise SandboxError(f"sandbox: unknown value {requested!r} (auto, landlock, bwrap or off)")


def describe(kind: SandboxKind) -> str:
    """One line for ``status``: which confinement is in force."""
    if kind is SandboxKind.LANDLOCK:
        abi = landlock_abi()
        scoped = ", signals scoped" if abi >= 6 else ""
        return f"landlock ABI {abi}: rw workspace+tmp, ro system{scoped}"
    if kind is SandboxKind.BWRAP:
        return "bwrap: rw workspace+tmp, ro system, private /tmp /dev, pid+ipc namespaces"
    return "none: sessions are NOT confined"


# --- the policy ---------------------------------------------------------------

@dataclass(frozen=True)
class SandboxPolicy:
    """Absolute paths a session may use; read-only implies execute. Nothing else is reachable."""
    read_write: tuple[str, ...]
    read_only: tuple[str, ...]


_DEVICES_RW = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
               "/dev/tty", "/dev/ptmx", "/dev/pts", "/dev/shm")
_SYSTEM_RO = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
              "/proc", "/sys")
# Secret-bearing entries under /etc that root (or a group member) could read.
_ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "sudoers.d",
                "ssh/ssh_host_*_key", "ssl/private", "security/opasswd", "credstore",
                "credstore.encrypted", "wireguard", "NetworkManager/system-connections",
                "ipsec.secrets", "krb5.keytab", "ppp/chap-secrets", "ppp/pap-secrets")
_SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")


def _grant_except(root: str, secrets: tuple[str, ...]) -> list[str]:
    """``root`` itself, or its children minus ``secrets`` (glob patterns relative to root)."""
    if not secrets:
        return [root]
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    granted: list[str] = []
    for name in names:
        if any(fnmatch.fnmatchcase(name, pat) for pat in secrets):
            continue
        inner = tuple(p.split("/", 1)[1] for p in secrets
                      if "/" in p and fnmatch.fnmatchcase(name, p.split("/", 1)[0]))
        child = os.path.join(root, name)
        granted += _grant_except(child, inner) if os.path.isdir(child) and not os.path.islink(child) else [child]
    return granted


def _install_prefix(real: Path) -> Path:
    """The directory a program was installed into: a node package, a bin/'s prefix, or its dir."""
    parts = real.parts
    if "node_modules" in parts:
        i = len(parts) - 1 - parts[::-1].index("node_modules")
        end = i + (3 if i + 1 < len(parts) and parts[i + 1].startswith("@") else 2)
        return Path(*parts[:end])
    if real.parent.name in ("bin", "sbin"):
        return real.parent.parent
    return real.parent


def _shebang_interpreter(real: Path) -> str | None:
    """The program a script's ``#!`` line runs (through ``env`` if need be)."""
    try:
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    return shutil.which(words[0]) if words else None


def _program_paths(command: str, forbidden: tuple[Path, ...]) -> list[str]:
    """Read-only grants for a program and its script interpreter, narrowed to the file when
    the install prefix would contain a forbidden place (home, the workspace's parents, /)."""
    grants: list[str] = []
    name: str | None = command
    for _ in range(2):  # the program, then its #! interpreter
        found = shutil.which(name) if name else None
        if found is None:
            if name:
                log.warning("sandbox: %s not found on PATH; not granted", name)
            break
        real = Path(os.path.realpath(found))
        prefix = _install_prefix(real)
        grants.append(str(real if any(contains(prefix, f) for f in forbidden) else prefix))
        name = _shebang_interpreter(real)
    return grants


def contains(outer: Path, inner: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies beneath it."""
    return inner == outer or outer in inner.parents


def _check_tmpdir(tmpdir: Path) -> None:
    """The private tmp must be a directory of its own, not a shared one or an ancestor of it."""
    real = Path(os.path.realpath(tmpdir))
    for shared in _SHARED_TMP:
        if contains(real, Path(os.path.realpath(shared))):
            raise SandboxError(f"sandbox: tmpdir {tmpdir} is (or contains) the shared {shared}; "
                               "give each session a private directory")


def check_read_only(paths: Iterable[str], parent: str) -> None:
    """No read-only grant may contain ``parent`` (the real directory that holds the
    workspaces): every sibling workspace would become readable."""
    # Strings, not Path.parents: ~160 grants.
    for p in paths:
        real = os.path.realpath(p)
        if parent == real or parent.startswith(real.rstrip("/") + "/"):
            raise SandboxError(f"sandbox: read-only path {p} contains the workspace parent {parent}; "
                               "other workspaces would be readable")


def _check_read_only(paths: list[str], parent: str,
                     checked: tuple[str, frozenset[str]] | None = None) -> None:
    """``check_read_only`` against ``parent``; ``checked`` = (parent, paths) that the
    supervisor already verified against that parent, so a boot need not resolve them again."""
    if checked is not None and checked[0] == parent:
        paths = [p for p in paths if p not in checked[1]]
    check_read_only(paths, parent)


def _dedupe_existing(paths: Iterable[str]) -> tuple[str, ...]:
    """Absolute, existing, unique paths in first-seen order (symlinks are kept: the
    kernel and bwrap both follow them to the object that is granted)."""
    seen: dict[str, None] = {}
    for p in paths:
        ap = os.path.abspath(p)
        if os.path.exists(ap):
            seen.setdefault(ap, None)
    return tuple(seen)


def read_only_paths(workspaces: Path, *, agent_command: str,
                    extra_read: Iterable[str] = ()) -> tuple[str, ...]:
    """The read-only half of a session policy: the same for every workspace under
    ``workspaces``, so a supervisor computes it once (it walks /etc: ~20 ms)."""
    forbidden = (Path("/"), Path(os.path.realpath(Path.home())), Path(os.path.realpath(workspaces)))
    prog = shlex.split(agent_command)[0] if agent_command.strip() else ""
    read_only = [p for d in _SYSTEM_RO
                 for p in (_grant_except(d, _ETC_SECRETS) if d == "/etc" else [d])]
    read_only += [sys.base_prefix, sys.prefix]
    for program in (prog, "git"):
        read_only += _program_paths(program, forbidden)
    read_only += list(extra_read)
    return _dedupe_existing(read_only)


def session_policy(workspace: Path, tmpdir: Path, *, agent_command: str,
                   extra_read: Iterable[str] = (), extra_write: Iterable[str] = (),
                   read_only: Iterable[str] | None = None,
                   checked: tuple[str, frozenset[str]] | None = None) -> SandboxPolicy:
    """What one session may touch: rw its workspace, private tmp and harmless devices;
    ro the system, the interpreter, git and the agent command; nothing else of $HOME.
    ``read_only`` is a precomputed ``read_only_paths`` for this workspace's parent, and
    ``checked`` what of it is already known not to contain that parent."""
    _check_tmpdir(tmpdir)
    if read_only is None:
        ro = read_only_paths(Path(os.path.realpath(workspace)).parent, agent_command=agent_command,
                             extra_read=extra_read)
    else:
        ro = tuple(read_only)
    _check_read_only(list(ro), os.path.dirname(os.path.realpath(workspace)), checked)
    rw = _dedupe_existing([str(workspace), str(tmpdir), *_DEVICES_RW, *extra_write])
    return SandboxPolicy(read_write=rw, read_only=tuple(p for p in ro if p not in rw))


def shared_policy(read_only: Iterable[str], workspaces: Path,
                  checked: tuple[str, frozenset[str]] | None = None) -> SandboxPolicy:
    """``session_policy`` without the workspace and its tmp: what any process confined to
    a workspace under ``workspaces`` may use. A parent can build its ruleset
    (``prepare_landlock``) before the workspace exists; the child then adds its
    ``own_grants`` (``add_landlock_rules``) and enters it."""
    ro = tuple(read_only)
    _check_read_only(list(ro), os.path.realpath(workspaces), checked)
    return SandboxPolicy(read_write=_dedupe_existing(_DEVICES_RW), read_only=ro)


def own_grants(workspace: Path, tmpdir: Path) -> tuple[str, ...]:
    """The read-write half of ``session_policy`` that ``shared_policy`` leaves out."""
    _check_tmpdir(tmpdir)
    return _dedupe_existing([str(workspace), str(tmpdir)])


# --- Landlock enforcement -----------------------------------------------------

class PathHandles:
    """O_PATH descriptors of the paths that rules name, opened once and reused while fresh.

    A daemon's ruleset names ~160 paths. Opening, stat'ing and closing each one for
    every ruleset took ~1.5 of the ~2.2 ms the supervisor spent per daemon (measured);
    the rules themselves take the rest. A rule binds the inode behind the
    descriptor, and files are replaced by rename (``/etc/passwd`` by ``useradd``), so a
    handle must not outlive its path for long: a generation of handles serves
    rulesets for ``fresh_for`` seconds (a burst of starts), then is closed, and the
    next ruleset opens the paths again. Within that window this is what opening the
    paths per ruleset gives, since a ruleset is never entered the instant it is
    built. Under a running event loop a generation also closes itself when it goes
    stale, so idle handles never pin a filesystem (``umount`` would say "busy")."""

    def __init__(self, fresh_for: float = 2.0) -> None:
        self.fresh_for = fresh_for
        self._handles: dict[str, tuple[int, bool] | None] = {}
        self._derived: dict[Any, Any] = {}
        self._layer_fds: list[int] = []  # the shared layers among _derived, closed with it
        self._stale_at = 0.0

    def get(self, path: str) -> tuple[int, bool] | None:
        """(descriptor, is a directory) for ``path``; None if it is missing or this uid
        cannot look it up (``_add_rule`` skips those). The descriptor stays ours."""
        self._renew_if_stale()
        if path not in self._handles:
            self._handles[path] = _open_path(path)
        return self._handles[path]

    def shared_layer(self, policy: SandboxPolicy, base: str) -> tuple[int, SandboxPolicy]:
        """``split_layers(policy, base)`` built from this generation's handles, once per
        generation and kept with it (its rules hold the same inodes); the descriptor
        stays ours, a caller hands on a ``dup``."""
        def build() -> tuple[int, SandboxPolicy]:
            layers = split_layers(policy, base, self)
            self._layer_fds.append(layers[0])
            return layers

        return self.derived(("shared layer", policy, base), build)

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, once per generation for ``key``: for what is worked out from the
        paths as they are now (whether they exist, where they resolve), as the handles are."""
        self._renew_if_stale()
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def _renew_if_stale(self) -> None:
        now = time.monotonic()
        if now >= self._stale_at:
            self.close()
            self._stale_at = now + self.fresh_for
            try:
                asyncio.get_running_loop().call_later(self.fresh_for, self._expire)
            except RuntimeError:  # no loop: the next get() after fresh_for renews them
                pass

    def _expire(self) -> None:
        if time.monotonic() >= self._stale_at:
            self.close()

    def __len__(self) -> int:
        return sum(h is not None for h in self._handles.values())

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        layer_fds, self._layer_fds = self._layer_fds, []
        self._derived = {}
        for handle in handles.values():
            if handle is not None:
                os.close(handle[0])
        for fd in layer_fds:
            os.close(fd)


def _open_path(path: str) -> tuple[int, bool] | None:
    """An O_PATH descriptor of ``path`` and whether it is a directory (see ``_add_rule``)."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        return None
    except OSError as exc:
        raise SandboxError(f"landlock: cannot open {path}: {exc.strerror}") from None
    try:
        return pfd, stat.S_ISDIR(os.fstat(pfd).st_mode)
    except BaseException:
        os.close(pfd)
        raise


def prepare_landlock(policy: SandboxPolicy, abi: int | None = None,
                     handles: PathHandles | None = None) -> int:
    """Build the ruleset and return its descriptor (close-on-exec).

    May run in the parent, so that the child only has to call ``restrict_self``.
    ``handles``: descriptors of the policy's paths to reuse (a supervisor building
    one ruleset per daemon); without them each path is opened for this ruleset.
    """
    abi = landlock_abi() if abi is None else abi
    if abi < 1:
        raise SandboxError("landlock: not available in this kernel")
    handled = handled_fs_rights(abi)
    attr = _RulesetAttr(handled, 0, (SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET) if abi >= 6 else 0)
    fd = _syscall(0, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if fd < 0:
        raise SandboxError(f"landlock: create_ruleset failed: {os.strerror(-fd)}")
    try:
        add_landlock_rules(fd, read_only=policy.read_only, read_write=policy.read_write, abi=abi,
                           handles=handles)
    except BaseException:
        os.close(fd)
        raise
    return fd


def split_layers(policy: SandboxPolicy, base: str,
                 handles: PathHandles | None = None) -> tuple[int, SandboxPolicy]:
    """The ruleset of ``policy`` plus a workspace directly under ``base``, as two layers:
    one that every workspace under ``base`` can share, and the policy of each one's own.

    Building ~165 rules per daemon was the supervisor's largest cost in a start. Landlock
    stacks layers, and an access must be allowed by each. The shared layer (returned
    built) is ``policy`` plus read-write on all of ``base``. The own layer (returned as a
    policy; each daemon's is built from it, and its workspace added) allows everything
    beneath a few covering directories, and exactly what ``policy`` grants inside
    ``base`` and on the directories that contain it: a grant outside them is covered by
    its topmost ancestor that does not contain ``base`` (``/etc/passwd`` by ``/etc``), and
    the shared layer keeps it to what ``policy`` says. Together they allow what a single
    ruleset of ``policy`` plus the own workspace allows: beneath ``base`` the shared layer
    allows everything and the own layer holds ``policy``'s rules and the workspace;
    elsewhere the own layer allows everything the shared one does, which is ``policy``.
    Paths are taken real (rules bind the object a symlink leads to)."""
    base = os.path.realpath(base)
    if not os.path.isdir(base):
        raise SandboxError(f"landlock: {base} is not a directory; no shared layer")
    containing = {base}
    parent = base
    while parent != "/":
        parent = os.path.dirname(parent)
        containing.add(parent)
    inside = base.rstrip("/") + "/"
    read_write: dict[str, None] = {}
    read_only: dict[str, None] = {}
    for paths, exact in ((policy.read_write, read_write), (policy.read_only, read_only)):
        for path in paths:
            real = os.path.realpath(path)
            if real in containing or real.startswith(inside):
                exact[path] = None  # as policy grants it
                continue
            while os.path.dirname(real) not in containing:
                real = os.path.dirname(real)
            read_write[real] = None  # everything beneath: the shared layer narrows it
    shared = prepare_landlock(SandboxPolicy(read_write=policy.read_write + (base,),
                                            read_only=policy.read_only), handles=handles)
    own = SandboxPolicy(read_write=tuple(read_write),
                        read_only=tuple(p for p in read_only if p not in read_write))
    return shared, own


def add_landlock_rules(ruleset_fd: int, *, read_only: Iterable[str] = (),
                       read_write: Iterable[str] = (), abi: int | None = None,
                       handles: PathHandles | None = None) -> None:
    """Grant more paths in a ruleset not yet enforced (one ``prepare_landlock`` built,
    possibly in another process that passed the descriptor on)."""
    handled = handled_fs_rights(landlock_abi() if abi is None else abi)
    rule = _PathBeneathAttr(0, -1)  # one struct, refilled per rule: ~170 rules per ruleset
    for paths, access in ((read_only, _READ_ONLY & handled), (read_write, handled)):
        for path in paths:
            handle = handles.get(path) if handles is not None else _open_path(path)
            try:
                _add_rule(ruleset_fd, rule, path, access, handle)
            finally:
                if handles is None and handle is not None:  # ours, for this rule only
                    os.close(handle[0])


def _add_rule(ruleset_fd: int, rule: "_PathBeneathAttr", path: str, access: int,
              handle: tuple[int, bool] | None) -> None:
    """Grant ``access`` beneath ``path``, opened as ``handle`` (``_open_path``).

    A path that vanished, or that this uid cannot even look up (e.g. the
    pyenv interpreter under a 0700 /root after dropping to an ordinary user),
    has no handle and is skipped: DAC already keeps the session out of it.
    """
    if handle is None:
        return
    pfd, is_dir = handle
    if not is_dir:
        access &= _FILE_RIGHTS
    rule.allowed_access, rule.parent_fd = access, pfd
    ret = _syscall(1, ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    if ret < 0:
        raise SandboxError(f"landlock: add_rule {path} failed: {os.strerror(-ret)}")


def drop_capability_bounding_set() -> None:
    """Empty the bounding and ambient sets, so uid 0 gains no capabilities at exec.

    Needs CAP_SETPCAP; for an unprivileged process there is nothing to drop.
    """
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:  # past CAP_LAST_CAP
                break
            return  # EPERM: no CAP_SETPCAP, so no capabilities to lose either
    _libc.prctl(_PR_CAP_AMBIENT, ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)


def restrict_self(ruleset_fd: int) -> None:
    """Enforce a prepared ruleset on the calling process (post-fork, pre-exec); irreversible."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise SandboxError(f"landlock: PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")
    drop_capability_bounding_set()
    ret = _syscall(2, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
    if ret < 0:
        raise SandboxError(f"landlock: restrict_self failed: {os.strerror(-ret)}")


def apply_landlock(policy: SandboxPolicy) -> None:
    """Confine the calling process (in the child, after fork and setuid, before exec)."""
    fd = prepare_landlock(policy)
    try:
        restrict_self(fd)
    finally:
        os.close(fd)


# --- bubblewrap ---------------------------------------------------------------

def _depth(path: str) -> int:
    return path.rstrip("/").count("/")


def _bwrap_mounts(policy: SandboxPolicy) -> list[str]:
    """Bind arguments, parents before children so later binds land inside earlier ones."""
    binds = [("--ro-bind", p) for p in policy.read_only if p != "/proc"]
    binds += [("--bind", p) for p in policy.read_write if not p.startswith("/dev/")]
    args: list[str] = []
    for flag, path in sorted(binds, key=lambda b: (_depth(b[1]), b[1])):
        args += [flag, path, path]
    return args


def bwrap_argv(policy: SandboxPolicy, argv: list[str], *, cwd: str) -> list[str]:
    """The command line that runs ``argv`` under bwrap with ``policy``; network stays shared."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bwrap: not found on PATH")
    return [bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--cap-drop", "ALL",
            "--tmpfs", "/tmp", "--dev", "/dev", "--tmpfs", "/dev/shm", "--proc", "/proc",
            *_bwrap_mounts(policy), "--remount-ro", "/tmp", "--remount-ro", "/", "--chdir", cwd, "--", *argv]
