"""The fork-server (zygote): preload once, fork each daemon in about a millisecond.

Design note
-----------
Starting a daemon with ``exec`` costs a fresh interpreter and ~100 ms of imports
(websockets, cryptography, yaml). The fork-server pays that once: it imports
everything a daemon needs, boots two throw-away daemons against an in-process
relay (``daemon.rehearse``: caches, type version tags and specialised bytecode
are then written once here, not copied into every daemon), then
``gc.freeze()``s the heap so forked children do not dirty the shared pages when
the collector walks them.

Protocol (SOCK_SEQPACKET, one JSON object per message): the supervisor sends
``{"id", "plan"}`` with the daemon's IPC socket attached (SCM_RIGHTS); the
fork-server answers ``{"id", "pid"}`` or ``{"id", "error"}``. It first sends
``{"ready": true}`` once preloaded. The daemon, not the server, parses the plan:
the server's work between forks is kept small (see _spawn).

Each daemon must be the supervisor's child, so that the supervisor reaps it and
learns its exit status directly, and must outlive a fork-server crash. The
fork-server (itself the supervisor's child) therefore forks with
``CLONE_PARENT`` (``proc.fork_as_sibling``): the daemon is born the
supervisor's child. Where that is unavailable it double-forks: an intermediate
child forks the daemon, sends its PID back and exits, and the daemon is
reparented to the supervisor (a child subreaper); the fork-server ignores
SIGCHLD, so the kernel reaps the intermediates. Measured at 100 starts, the
intermediate's fork and exit were ~11 % of the machine's CPU in the spawn
window. The fork-server exits when the supervisor closes the socket, and dies
with the supervisor (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import re
import signal
import socket
import sys
from types import CodeType, FunctionType
from typing import Any, Callable

from .system import proc

MAX_REQUEST = 64 * 1024
SIBLING_FORK = False  # set in main(): fork daemons with CLONE_PARENT
SUPERVISOR_PID = 0  # set in main(): our parent


def preload(rehearse: bool = True) -> None:
    """Import and warm everything a daemon touches, before freezing the heap."""
    import asyncio.unix_events  # noqa: F401 - what asyncio.run needs on Linux
    from . import daemon
    daemon.preload()
    if rehearse:
        hot = hot_code(lambda: daemon.rehearse(1))
        gc.collect()
        fill_free_blocks()  # so that the copies below are packed on fresh pages
        pack_code(hot)
        daemon.rehearse(1)  # warm the copies: the bytecode daemons will run
    gc.collect()
    fill_free_blocks()
    AT_FORK.find()
    gc.freeze()


def hot_code(run: Callable[[], object]) -> set[CodeType]:
    """The code objects of every Python function ``run()`` calls (cProfile's record).

    Empty, with ``run()`` still run, where another profiler holds the hook (Python
    3.12+ refuses a second one): the daemons then run the original code."""
    prof = cProfile.Profile()
    try:
        prof.enable()
    except ValueError:
        run()
        return set()
    try:
        run()
    finally:
        prof.disable()
    return {entry.code for entry in prof.getstats() if isinstance(entry.code, CodeType)}


_PACKED: dict[CodeType, CodeType] = {}  # original -> copy; the originals are kept, see pack_code


def pack_code(hot: set[CodeType]) -> int:
    """Give every function whose code is in ``hot`` a fresh copy of that code.

    Calling a function writes to its code object (reference counts, and the
    specialising interpreter's counters in the bytecode), and that write copies
    the whole 4 kB page into the daemon. The daemon's ~700 functions are spread
    over thousands of pages among the code of everything else that was
    imported; copied here, one after another onto fresh pages, they share few
    (median idle USS at N = 100: about 0.5 MB less). Hot nested code (lambdas,
    comprehensions, inner functions) is copied with its outer code. The
    originals are kept alive: freed, they would leave holes that a daemon's
    first allocations fill, copying those pages instead. Returns the number of
    functions repointed."""
    def copy(code: CodeType) -> CodeType:
        if code not in _PACKED:
            consts = tuple(copy(c) if isinstance(c, CodeType) and c in hot else c
                           for c in code.co_consts)
            _PACKED[code] = code.replace(co_consts=consts)
        return _PACKED[code]

    moved = 0
    for obj in gc.get_objects():
        if isinstance(obj, FunctionType) and obj.__code__ in hot:
            obj.__code__ = copy(obj.__code__)
            moved += 1
    return moved


class _AtFork:
    """Fork daemons without the Python-level after-fork hooks they do not need.

    CPython runs every ``os.register_at_fork(after_in_child=...)`` hook in each
    child: ``random`` reseeds, ``threading`` rebuilds its thread table and locks,
    ``logging`` re-creates every handler's lock. Each runs Python code that
    writes to shared pages (about 0.3 MB per daemon, measured with
    ``bench/profile_daemon.py``). Their purpose is locks another thread held at
    the fork; the fork-server has a single thread (checked before each fork), so
    none can be held but the one ``logging`` takes on purpose before a fork,
    which the child releases. Hooks this class does not know still run. The
    daemon then reseeds ``random`` itself (so that daemons draw different
    jitter) and puts the full list back, so its own forks are untouched.

    The server's part is kept to a few item assignments (``lean``/``full``): it
    forks every daemon in turn, and each write it makes after a fork copies a
    page the newest daemon still shares."""

    def __init__(self) -> None:
        self.hooks: list[Any] | None = None  # CPython's after-fork-in-child list
        self.full: list[Any] = []
        self.lean: list[Any] = []  # same length: a hook, its cheap stand-in, or a no-op

    def find(self) -> None:
        """Locate the interpreter's hook list (a plain list that holds threading's
        hook) before gc.freeze() hides it from gc.get_referrers. Anything not as
        expected leaves every hook running."""
        import logging
        import random
        import threading
        try:
            stand_in = {threading._after_fork: gc.isenabled,  # a C call that changes nothing
                        random._inst.seed: gc.isenabled,  # reseeded in the daemon instead
                        logging._after_at_fork_child_reinit_locks: logging._lock._at_fork_reinit}
        except AttributeError:
            return
        lists = [ref for ref in gc.get_referrers(threading._after_fork)
                 if type(ref) is list and threading._after_fork in ref]
        if len(lists) != 1:
            return
        self.hooks = lists[0]
        self.full = list(self.hooks)
        self.lean = [stand_in.get(hook, hook) for hook in self.full]

    def use_lean(self, *, check_threads: bool = True) -> bool:
        """Before a fork in the server: the child will run only the hooks it needs.
        False (every hook runs) unless it is safe; after a True, call use_full().
        ``check_threads=False`` where the fork itself refuses a caller with threads."""
        hooks = self.hooks  # (no allocations here: each one could copy a page)
        if hooks is None or hooks != self.full:
            return False  # not found, or changed since find(): run it as it is
        if check_threads and proc.thread_count() != 1:
            return False
        hooks[:] = self.lean  # same length: the list keeps its storage
        return True

    def use_full(self) -> None:
        """Put every hook back (in the server after a fork, and in each daemon)."""
        if self.hooks is not None and len(self.hooks) == len(self.full):
            self.hooks[:] = self.full

    def in_daemon(self) -> None:
        """First thing in a daemon forked with the lean hooks."""
        import _random
        import random
        _random.Random.seed(random.seed.__self__)  # what random's hook does, minus its Python frame


AT_FORK = _AtFork()


_FILLERS: list[object] = []  # never freed: they hold the heap's holes (see fill_free_blocks)
_POOL_ROW = re.compile(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", re.M)


def fill_free_blocks() -> int:
    """Occupy every free block in the small-object allocator's partly used pools.

    Imports and the rehearsal leave a few thousand freed blocks scattered across
    the heap. A forked daemon's first allocations would land in them, and each
    landing copies a whole shared 4 kB page for one small object. Filled here
    with objects of each size class that nobody touches again, they stay shared,
    and a daemon's allocations go to fresh pages of its own, packed together
    (median idle USS at N = 100: ~0.3 MB less). The free counts come from
    ``sys._debugmallocstats()`` ("avail blocks" per size class); if its format
    ever changes, nothing is filled. Returns the number of blocks filled."""
    filled = 0
    if not hasattr(sys, "_debugmallocstats"):  # not CPython
        return filled
    for size, avail in _POOL_ROW.findall(_debug_malloc_stats()):
        size, avail = int(size), int(avail)
        if size == 32:  # a float is 24 bytes
            _FILLERS.extend(float(i) for i in range(avail))
        elif size >= 48:  # a bytes object of n bytes takes 33 + n
            _FILLERS.extend(bytes(size - 33) for _ in range(avail))
        else:
            continue
        filled += avail
    return filled


def _debug_malloc_stats() -> str:
    """What ``sys._debugmallocstats()`` writes to the C-level stderr."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        return out.read()


def prestart() -> tuple[int, socket.socket]:
    """Fork *this* process, a supervisor that is starting (one thread, few imports),
    into the fork-server; returns its PID and our end of its socket.

    The restart path (``ForkServerClient.start``) execs a fresh interpreter; at
    first start forking the supervisor skips that interpreter's start-up and
    ``site`` (~50 ms), and doing it before the supervisor loads its config and
    imports itself lets the ~0.2 s preload overlap them. The child sets itself up
    through the same ``apply_in_child`` as every other child (own session, tied to
    the supervisor, descriptors closed but its socket) and never returns."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:  # pragma: no cover - runs in the child, seen through its socket
        status = 1
        try:
            ours.close()
            from .spawner import apply_in_child, forkserver_plan
            plan = forkserver_plan(supervisor_pid)
            plan.keep_fds = (theirs.fileno(),)
            apply_in_child(plan)
            status = main(["--fd", str(theirs.fileno())])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - never return into the supervisor's code
            os.write(2, f"agentctl-swarm: fork-server: {exc!r}\n".encode())
        finally:
            os._exit(status)
    theirs.close()
    ours.setblocking(False)
    return pid, ours


def serve(sock: socket.socket) -> int:
    """Answer spawn requests until the supervisor hangs up."""
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 4)
        except InterruptedError:
            continue
        except OSError:
            return 1
        if not data:
            return 0
        _handle(sock, data, fds)


def _handle(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    req_id = -1
    try:
        req = json.loads(data)
        req_id = int(req["id"])
        if len(fds) != 1:
            raise ValueError(f"expected 1 descriptor, got {len(fds)}")
        _spawn(sock, req_id, req["plan"], fds[0])
    except Exception as exc:  # noqa: BLE001 - one bad request must not end the server
        _reply(sock, {"id": req_id, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for fd in fds:
            os.close(fd)


def _spawn(sock: socket.socket, req_id: int, plan_json: str, ipc_fd: int) -> None:
    """Fork the daemon and answer with its PID; the daemon reads its own plan.

    The server forks every daemon in turn, and each page it writes after a fork is
    copied (the newest daemon still shares it): parsing the plan in the child and
    answering with preformatted bytes took ~56 page faults off each fork."""
    if SIBLING_FORK:
        pid = _fork_lean(proc.fork_as_sibling, refuses_threads=True)
        if pid == 0:
            sock.close()
            _run_daemon(plan_json, ipc_fd, reparenting=False)
        _answer(sock, req_id, pid)
        return
    if _fork_lean(os.fork) != 0:
        return  # the server: the intermediate answers for us
    try:
        pid = _fork_lean(os.fork)
        if pid == 0:
            sock.close()
            # our parent, the intermediate, exits at once; the daemon waits for that
            _run_daemon(plan_json, ipc_fd, reparenting=True)
        _answer(sock, req_id, pid)
    finally:
        os._exit(0)


def _fork_lean(fork: Callable[[], int], *, refuses_threads: bool = False) -> int:
    """``fork()`` with the lean after-fork hooks (see _AtFork); the full list is back
    in the server afterwards, whether the fork worked or not. ``refuses_threads``:
    ``fork`` raises in a process with threads (fork_as_sibling), so the thread count
    is not read twice per fork."""
    lean = AT_FORK.use_lean(check_threads=not refuses_threads)
    try:
        return fork()
    finally:
        if lean:
            AT_FORK.use_full()  # in the child too: a page it would write anyway


def _run_daemon(plan_json: str, ipc_fd: int, reparenting: bool) -> None:
    """In the daemon, right after the fork: read the plan, set up, run. Never returns."""
    from . import daemon
    from .spawner import LaunchPlan, apply_in_child, child_fail, tie_to_parent
    AT_FORK.in_daemon()
    try:
        plan = LaunchPlan.from_json(plan_json)
    except Exception as exc:  # noqa: BLE001 - e.g. a server from another version of the package
        # Fail like any set-up: first belong to the supervisor, so that it reaps us
        # and reads the exit code (a double-forked child might otherwise vanish).
        tie_to_parent(SUPERVISOR_PID, signal.SIGKILL, reparenting)
        child_fail("daemon", ValueError(f"unreadable launch plan: {exc}"))
    plan.keep_fds = (ipc_fd,)
    plan.reparenting = reparenting
    apply_in_child(plan)
    code = 1
    try:
        code = daemon.main_forked(ipc_fd)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _answer(sock: socket.socket, req_id: int, pid: int) -> None:
    try:
        sock.send(b'{"id": %d, "pid": %d}' % (req_id, pid))
    except OSError:
        pass


def _reply(sock: socket.socket, msg: dict) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:
        pass


def _own_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Our only children are double-fork intermediates: let the kernel reap them.
    # (apply_in_child resets SIGCHLD in each daemon.)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentctl-swarm-forkserver")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--double-fork", action="store_true",
                        help="always fork through an intermediate (the fallback path)")
    args = parser.parse_args(argv)
    _own_signals()
    sock = socket.socket(fileno=args.fd)
    from .system.title import set_title
    set_title("agentctl-swarm fork-server")
    preload()
    _own_signals()  # the rehearsal's event loop reset them
    set_title("agentctl-swarm fork-server")
    global SIBLING_FORK, SUPERVISOR_PID
    SIBLING_FORK = not args.double_fork and proc.can_fork_as_sibling()
    SUPERVISOR_PID = os.getppid()
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
