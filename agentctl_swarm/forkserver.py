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

Protocol (SOCK_SEQPACKET, one message per request): the supervisor sends
``<id>\\n<plan as JSON>`` with the daemon's IPC socket attached (SCM_RIGHTS);
the fork-server answers with a JSON object, ``{"id", "pid"}`` or
``{"id", "error"}``. It first sends ``{"ready": true}`` once preloaded. The
server reads only the id; the daemon parses the plan: the server's work between
forks is kept small (see serve).

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

import _thread
import argparse
import errno
import gc
import json
import os
import re
import signal
import socket
import sys
from contextvars import ContextVar
from types import CodeType, FrameType, FunctionType, ModuleType
from typing import Any, Callable, NamedTuple

from .system import proc

MAX_REQUEST = 64 * 1024
MAX_FDS = 4  # IPC, relay, own and shared Landlock layers; more is an error, received (and closed) whole
SIBLING_FORK: Callable[[], int] | None = None  # set in main(): forks with CLONE_PARENT, if it can
SUPERVISOR_PID = 0  # set in main(): our parent


def preload(rehearse: bool = True) -> None:
    """Import and warm everything a daemon touches, before freezing the heap."""
    import asyncio.unix_events  # noqa: F401 - what asyncio.run needs on Linux
    from . import daemon
    daemon.preload()
    if rehearse:
        # Frozen for now, what the imports made is left out of the collection below,
        # which then looks only at what the rehearsal made (~1 ms instead of ~13 for
        # the whole heap; the imports leave a handful of garbage objects).
        gc.freeze()
        # Not the rehearsal's scaffold (its relay, the stand-in supervisor): code no
        # daemon runs would only spread the daemons' code over more pages.
        hot = hot_code(lambda: daemon.rehearse(1), unless=daemon.REHEARSAL_SCAFFOLD)
        gc.collect()
        gc.unfreeze()  # the walk below and AT_FORK.find look through every object
        heap = _functions_on_heap()
        fill_free_blocks()  # so that the copies below are packed on fresh pages
        pack_code(hot | _serving_code() if hot else hot, heap.functions)
        fill_free_blocks()
        pack_functions(set(_PACKED.values()), heap)
        del heap
        # Packing leaves almost no garbage (a full collection here found 5 objects and
        # took ~11 ms); what it leaves is frozen with the rest.
    else:
        gc.collect()
    fill_free_blocks()
    AT_FORK.find()
    if rehearse:
        # Last, so that CPython's attribute cache holds what a daemon looks up
        # (each entry a daemon has to add writes a reference to the name, and
        # names lie all over the heap), and so that the copies are warm: the
        # specialised bytecode daemons will run. Measured at N = 100 (A/B), a
        # warm cache left idle daemons ~0.08 MB smaller than one rehearsal earlier.
        daemon.rehearse(1)
    gc.freeze()


def hot_code(run: Callable[[], object], unless: ContextVar[bool] | None = None) -> set[CodeType]:
    """The code objects of every Python function ``run()`` calls (including the code of
    generators, coroutines and comprehensions), except while ``unless`` is true in the
    running context (an asyncio task and the callbacks it schedules inherit their
    context). A trace function that was already set is put back.

    A trace function (``sys.settrace``), not a profile hook: it is called once as each
    Python frame starts or resumes, and returns None so that the frame's lines are not
    traced; a profile hook is also called at every return and around every call of a
    built-in (the rehearsal took 1.6-1.9x its own time under one, 1.3-1.6x under this)."""
    codes: dict[int, CodeType] = {}  # by id: a code object's hash reads all its bytecode

    def record(frame: FrameType, _event: str, _arg: object) -> None:
        if unless is None or not unless.get():
            code = frame.f_code
            codes[id(code)] = code

    previous = sys.gettrace()
    sys.settrace(record)
    try:
        run()
    finally:
        sys.settrace(previous)
    return set(codes.values())


_PACKED: dict[CodeType, CodeType] = {}  # original -> copy; the originals are kept, see pack_code


class _Heap(NamedTuple):
    functions: list[FunctionType]
    wrappers: list[Any]  # every static method, class method and property


def _functions_on_heap() -> _Heap:
    """One walk of the whole heap for pack_code and pack_functions. It is memory-bound:
    ~0.3 us an object here (~9 ms for the fork-server's ~27000), whatever the loop does."""
    functions, wrappers = [], []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is FunctionType:  # (it has no subclasses)
            functions.append(obj)
        elif kind is staticmethod or kind is classmethod or kind is property:
            wrappers.append(obj)
    return _Heap(functions, wrappers)


def pack_code(hot: set[CodeType], functions: list[FunctionType] | None = None) -> int:
    """Give every function whose code is in ``hot`` a fresh copy of that code.

    Calling a function writes to its code object (reference counts, and the
    specialising interpreter's counters in the bytecode), and that write copies
    the whole 4 kB page into the daemon. The daemon's ~600 functions are spread
    over thousands of pages among the code of everything else that was
    imported; copied here, one after another onto fresh pages, they share few
    (median idle USS at N = 100: about 0.5 MB less). Hot nested code (lambdas,
    comprehensions, inner functions) is copied with its outer code. The
    originals are kept alive: freed, they would leave holes that a daemon's
    first allocations fill, copying those pages instead. ``functions``: every function
    there is (found through the collector if not given). Returns the number of
    functions repointed."""
    def copy(code: CodeType) -> CodeType:
        if code not in _PACKED:
            consts = tuple(copy(c) if isinstance(c, CodeType) and c in hot else c
                           for c in code.co_consts)
            _PACKED[code] = code.replace(co_consts=consts)
        return _PACKED[code]

    # By identity: a code object's hash reads all its bytecode and constants, cold
    # memory for most of the ~6000 functions (~7 ms here, ~1 by id).
    hot_ids = {id(code) for code in hot}
    moved = 0
    for func in _functions_on_heap().functions if functions is None else functions:
        if id(func.__code__) in hot_ids:
            func.__code__ = copy(func.__code__)
            moved += 1
    return moved


_CLONES: dict[FunctionType, FunctionType] = {}  # original -> copy; the originals are kept


def pack_functions(hot: set[CodeType], heap: _Heap | None = None) -> int:
    """Put a fresh copy of every function whose code is in ``hot`` where a module or a
    class names it (as a function, a static or class method, or a property's accessor).

    Calling a function, or taking a bound method of it, writes its reference count,
    and so do the coroutines it makes to its name and qualified name. Those
    functions lie all over the heap, each among the objects its module made at
    import; copied here one after another, with their names, they share a few
    pages (A/B at N = 100, with the rest of this change: ~0.1 MB less per idle
    daemon). References held elsewhere (a bound method in a callback list, a
    decorator's closure) keep the original, which still works: a copy shares the
    code, globals, defaults, closure and ``__dict__``. Class attributes are set
    with ``setattr``, so the attribute caches see the change. Functions that
    ``AT_FORK`` finds by identity are left alone. ``heap``: what
    ``_functions_on_heap`` found, if it was called already. Returns the number of
    names repointed."""
    def clone(func: FunctionType) -> FunctionType:
        if func not in _CLONES:
            new = FunctionType(func.__code__, func.__globals__, _copy_str(func.__name__),
                               func.__defaults__, func.__closure__)
            new.__kwdefaults__ = func.__kwdefaults__
            new.__qualname__ = _copy_str(func.__qualname__)
            new.__module__ = func.__module__
            new.__doc__ = func.__doc__
            new.__dict__ = func.__dict__
            if func.__annotations__:
                new.__annotations__ = func.__annotations__
            _CLONES[func] = new
        return _CLONES[func]

    def is_hot(func: object) -> bool:
        return type(func) is FunctionType and id(func.__code__) in hot_ids and func not in keep

    hot_ids = {id(code) for code in hot}

    keep = set(AT_FORK.known_hooks())
    # The few hundred modules and ~1500 classes name ~30000 things, of which a few
    # hundred are hot (or wrap a hot function): a dict that holds none of those is
    # passed over without a Python-level look at each of its values.
    functions, wrappers = heap or _functions_on_heap()
    holders = {id(func) for func in functions if is_hot(func)}
    holders.update(id(obj) for obj in wrappers if not holders.isdisjoint(
        map(id, (obj.fget, obj.fset, obj.fdel) if type(obj) is property else (obj.__func__,))))
    moved = 0
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", None)
        if type(names) is not dict or holders.isdisjoint(map(id, names.values())):
            continue
        for name, value in list(names.items()):
            if is_hot(value):
                names[name] = clone(value)
                moved += 1
    for cls in _all_classes():
        if holders.isdisjoint(map(id, vars(cls).values())):
            continue
        for name, value in list(vars(cls).items()):
            if is_hot(value):
                new = clone(value)
            elif type(value) in (staticmethod, classmethod) and is_hot(value.__func__):
                new = type(value)(clone(value.__func__))
            elif type(value) is property and any(map(is_hot, (value.fget, value.fset, value.fdel))):
                new = property(*(clone(f) if is_hot(f) else f
                                 for f in (value.fget, value.fset, value.fdel)), value.__doc__)
            else:
                continue
            try:
                setattr(cls, name, new)
            except TypeError:  # a built-in or otherwise immutable class
                continue
            moved += 1
    return moved


def _copy_str(text: str) -> str:
    """A new string equal to ``text`` (allocated now, next to what is being packed)."""
    return (text + ".")[:-1]


def _all_classes() -> list[type]:
    """Every class that derives from ``object`` and is still alive."""
    found: dict[int, type] = {}
    todo: list[type] = [object]
    while todo:
        cls = todo.pop()
        if id(cls) in found:
            continue
        found[id(cls)] = cls
        try:
            todo.extend(cls.__subclasses__())
        except TypeError:  # type.__subclasses__ needs its argument
            todo.extend(type.__subclasses__(cls))
    return list(found.values())


class _AtFork:
    """Fork daemons without the Python-level fork hooks they do not need.

    CPython runs every ``os.register_at_fork`` hook around each fork: in the
    child, ``random`` reseeds, ``threading`` rebuilds its thread table and locks,
    ``logging`` re-creates every handler's lock; in the parent, ``logging`` takes
    and releases its module lock. Each runs Python code that writes to shared
    pages (in the child about 0.3 MB per daemon, measured with
    ``bench/profile_daemon.py``; in the server, pages the newest daemon still
    shares). Their purpose is locks another thread held at the fork; the
    fork-server has a single thread (checked before each fork), so none can be
    held, and the child only re-creates logging's module lock. Hooks this class
    does not know still run. The daemon then reseeds ``random`` itself (so that
    daemons draw different jitter) and puts the full lists back, so its own forks
    are untouched.

    The server installs the lean lists once, when it starts serving, and keeps
    them (``use_lean``/``use_full`` are a few item assignments)."""

    def __init__(self) -> None:
        # CPython's three hook lists (before, after in child, after in parent),
        # each with its full contents and its lean stand-in
        self.lists: list[tuple[list[Any], list[Any], list[Any]]] = []

    def find(self) -> None:
        """Locate the interpreter's hook lists (plain lists that hold the known hooks)
        before gc.freeze() hides them from gc.get_referrers. Anything not as
        expected leaves every hook running."""
        import logging
        import random
        import threading
        try:
            skipped = {threading._after_fork, random._inst.seed,  # random: reseeded in the daemon
                       logging._acquireLock, logging._releaseLock}
            stand_in = {logging._after_at_fork_child_reinit_locks: logging._lock._at_fork_reinit}
        except AttributeError:
            return
        found = []
        ours = [full for _, full, _ in self.lists]  # our copies from an earlier find()
        knowns = (logging._acquireLock, threading._after_fork, logging._releaseLock)
        holders = [ref for ref in gc.get_referrers(*knowns)  # one walk of the heap, not three
                   if type(ref) is list and not any(ref is copy for copy in ours)]
        for known in knowns:
            lists = [ref for ref in holders if known in ref]
            if len(lists) != 1:
                return
            full = list(lists[0])
            lean = [stand_in.get(hook, hook) for hook in full if hook not in skipped]
            found.append((lists[0], full, lean))
        self.lists = found

    @staticmethod
    def known_hooks() -> list[object]:
        """The functions find() looks for by identity (not to be replaced by copies)."""
        import logging
        import random
        import threading
        names = ((logging, "_acquireLock"), (logging, "_releaseLock"), (threading, "_after_fork"),
                 (logging, "_after_at_fork_child_reinit_locks"), (random.Random, "seed"))
        return [vars(owner)[name] for owner, name in names if name in vars(owner)]

    def use_lean(self) -> bool:
        """Every fork from now on runs only the hooks a single-threaded server's
        child needs (the caller makes sure there is one thread). False (every hook
        runs) if the lists were not found or have changed since find()."""
        if not self.lists or any(hooks != full for hooks, full, _ in self.lists):
            return False
        for hooks, _, lean in self.lists:
            hooks[:] = lean
        return True

    def use_full(self) -> None:
        """Put every hook back (in each daemon, or in the server if a thread appears)."""
        if all(hooks == lean for hooks, _, lean in self.lists):
            for hooks, full, _ in self.lists:
                hooks[:] = full

    @property
    def lean(self) -> bool:
        return bool(self.lists) and all(hooks == lean for hooks, _, lean in self.lists)

    def in_daemon(self) -> None:
        """First thing in a daemon forked with the lean hooks."""
        import _random
        import random
        _random.Random.seed(random.seed.__self__)  # what random's hook does, minus its Python frame
        self.use_full()


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


_REQUEST = bytearray(MAX_REQUEST)  # every request is received into this one buffer (see serve)
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # an int: the enum's "|" is Python code


def _serving_code() -> set[CodeType]:
    """The code the server runs between two forks, and a daemon from its fork to its
    main (never rehearsed: it sets up a process), packed with the daemons' own."""
    codes = {func.__code__ for func in (serve, _received_fds, _handle, _spawn, _answer,
                                        proc.sibling_forker.__wrapped__)}
    codes |= _code_named_from(_run_daemon)
    return codes | {const for code in codes for const in code.co_consts if isinstance(const, CodeType)}


def _code_named_from(root: FunctionType) -> set[CodeType]:
    """The code of ``root`` and of every function of this package it names, transitively
    (a static stand-in for what it calls: a global or attribute name is looked up in
    the function's globals and in every module of the package, and a class, module or
    instance found that way contributes the methods its code names). Local variable
    names are not names of anything: a parameter called ``main`` once pulled in
    ``relay.main`` and all it calls."""
    package = [module for name, module in list(sys.modules.items())
               if name == __package__ or name.startswith(__package__ + ".")]
    named: dict[str, list[object]] = {}  # name -> what the package's modules call it
    for module in package:
        for name, value in vars(module).items():
            if value is not None:
                named.setdefault(name, []).append(value)
    found: set[CodeType] = set()
    todo: list[object] = [root]
    while todo:
        func = todo.pop()
        func = getattr(func, "__func__", func)  # a static or class method
        if type(func) is not FunctionType or func.__code__ in found \
                or not (func.__module__ or "").startswith(__package__):
            continue
        found.add(func.__code__)
        codes = [func.__code__, *(c for c in func.__code__.co_consts if isinstance(c, CodeType))]
        names = {name for code in codes for name in code.co_names}  # globals and attributes
        for name in names:
            # func's globals are its module's, one of the package's (a wrapper that copied
            # a package function's __module__ has another's; its names are looked up here
            # in the package's modules only, which found the same code when compared)
            for value in named.get(name, ()):
                todo.append(value)
                owner = value if isinstance(value, (type, ModuleType)) else type(value)
                todo.extend(vars(owner)[attr] for attr in names if attr in vars(owner))
    return found


def serve(sock: socket.socket) -> int:
    """Answer spawn requests until the supervisor hangs up.

    The server forks every daemon in turn, and each page it writes between two
    forks is copied (the newest daemon still shares it), so that page ends up
    private to the daemon: its USS. The loop therefore does as little as it can
    per request: it receives into one preallocated buffer, reads only the
    request's id, keeps the lean fork hooks installed (``_AtFork``) and leaves
    the plan to the daemon, which parses its own copy of the buffer."""
    sock.send(b'{"ready": true, "pid": %d}' % os.getpid())
    AT_FORK.use_lean()
    buffers = (_REQUEST,)
    while True:
        try:
            size, ancillary, flags, _addr = sock.recvmsg_into(buffers, _ANCILLARY)
        except InterruptedError:
            continue
        except OSError:
            return 1
        fds = _received_fds(ancillary)
        if not size and not fds:
            return 0
        try:
            _handle(sock, size, flags, fds)
        finally:
            for fd in fds:
                os.close(fd)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(data[:len(data) - len(data) % 4]).cast("i"))
    return fds


def _handle(sock: socket.socket, size: int, flags: int, fds: list[int]) -> None:
    """One request: ``<id>\\n<plan JSON>`` with the daemon's IPC socket attached, then
    the descriptors the plan's ``extra["fds"]`` names (``Spawner.spawn_daemon``)."""
    req_id = -1
    try:
        header = _REQUEST.find(b"\n", 0, size)
        if header < 0:
            raise ValueError("request has no id line")
        req_id = int(_REQUEST[:header])
        if flags & _TRUNCATED:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes or {MAX_FDS} descriptors")
        if not 1 <= len(fds) <= MAX_FDS:
            raise ValueError(f"expected 1 to {MAX_FDS} descriptors, got {len(fds)}")
        _spawn(sock, req_id, header + 1, size, fds)
    except Exception as exc:  # noqa: BLE001 - one bad request must not end the server
        _reply(sock, {"id": req_id, "error": f"{type(exc).__name__}: {exc}"})


def _spawn(sock: socket.socket, req_id: int, start: int, end: int, fds: list[int]) -> None:
    """Fork the daemon and answer with its PID; the daemon reads its own plan
    (``_REQUEST[start:end]``, its copy of the buffer)."""
    if SIBLING_FORK is not None:
        if _thread._count():  # (any other thread was ruled out before serving: main())
            raise OSError(errno.EDEADLK, "the fork-server has a second thread")
        pid = SIBLING_FORK()
        if pid == 0:
            sock.close()
            _run_daemon(_REQUEST[start:end], fds, reparenting=False)
        _answer(sock, req_id, pid)
        return
    if _fork() != 0:
        return  # the server: the intermediate answers for us
    try:
        pid = _fork()
        if pid == 0:
            sock.close()
            # our parent, the intermediate, exits at once; the daemon waits for that
            _run_daemon(_REQUEST[start:end], fds, reparenting=True)
        _answer(sock, req_id, pid)
    finally:
        os._exit(0)


def _fork() -> int:
    """``os.fork()`` on the double-fork path: lean hooks only while there is one thread."""
    if AT_FORK.lean and proc.thread_count() != 1:
        AT_FORK.use_full()  # another thread could hold a lock at the fork: every hook runs
    return os.fork()


def _run_daemon(plan_json: bytes | bytearray, fds: list[int], reparenting: bool) -> None:
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
    plan.keep_fds = tuple(fds)
    plan.reparenting = reparenting
    apply_in_child(plan)
    code = 1
    try:
        code = daemon.main_forked(fds[0], dict(zip(plan.extra.get("fds", ()), fds[1:])))
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
    if not args.double_fork and proc.can_fork_as_sibling():
        SIBLING_FORK = proc.sibling_forker()
    SUPERVISOR_PID = os.getppid()
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
