"""What the fork-server does to its heap and its forks so that daemons copy fewer pages.

- ``pack_code``: the code of every function the rehearsal called is copied onto
  fresh, contiguous pages, and the functions are repointed at the copies.
- ``AT_FORK``: daemons are forked without CPython's Python-level after-fork hooks
  (random, threading, logging), with what those hooks guarantee kept another way.

Each test runs in a fresh interpreter: both change process-wide state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PACK = """
    import json
    from agentctl_swarm import forkserver

    def outer(n):
        double = lambda x: 2 * x
        return [double(i) for i in range(n)]

    def cold():
        return "cold"

    originals = {"outer": outer.__code__, "cold": cold.__code__}
    hot = forkserver.hot_code(lambda: outer(3))
    moved = forkserver.pack_code(hot)
    lambda_code = outer.__code__.co_consts  # the copy's constants: the nested code, copied too
    nested = [c for c in lambda_code if hasattr(c, "co_code")]
    print(json.dumps({
        "moved": moved,
        "outer_copied": outer.__code__ is not originals["outer"],
        "outer_same_code": outer.__code__ == originals["outer"],
        "outer_works": outer(4),
        "cold_untouched": cold.__code__ is originals["cold"],
        "original_kept": forkserver._PACKED.get(originals["outer"]) is outer.__code__,
        "nested_copied": bool(nested) and all(c in forkserver._PACKED.values() for c in nested),
    }))
"""


def test_pack_code_repoints_hot_functions_and_keeps_the_originals() -> None:
    data = _run(PACK)
    assert data["moved"] >= 1
    assert data["outer_copied"] and data["outer_same_code"]
    assert data["outer_works"] == [0, 2, 4, 6]
    assert data["cold_untouched"]
    assert data["original_kept"]  # freed, they would leave holes that daemons fill
    assert data["nested_copied"]  # the lambda and the comprehension run from copies too


PRELOAD = """
    import json
    from agentctl_swarm import forkserver
    forkserver.preload()
    originals = {id(code) >> 12 for code in forkserver._PACKED}
    copies = {id(code) >> 12 for code in forkserver._PACKED.values()}
    print(json.dumps({"functions": len(forkserver._PACKED),
                      "original_pages": len(originals), "copy_pages": len(copies)}))
"""


def test_preload_packs_the_daemons_code_onto_fewer_pages() -> None:
    data = _run(PRELOAD)
    assert data["functions"] >= 200, data  # a daemon's boot runs hundreds of functions
    # The point of the copies: the code a daemon runs shares far fewer 4 kB pages
    # (measured: ~460 pages of originals, ~150 of copies).
    assert data["copy_pages"] * 2 <= data["original_pages"], data


AT_FORK = """
    import json, logging, os, random, sys, threading
    from agentctl_swarm import forkserver

    ran = []
    python_calls = []  # Python functions of the standard library entered while forking (hooks)

    def watch(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module != "__main__" and not module.startswith("agentctl_swarm"):
            python_calls.append(frame.f_code.co_name)

    def child_report(fd, as_daemon):
        msg = {"limbo_lock": id(threading._active_limbo_lock), "extra_hook_ran": bool(ran),
               "hooks_in_child": list(python_calls)}
        if as_daemon:
            forkserver.AT_FORK.in_daemon()  # what the fork-server's _run_daemon does first
        msg["random"] = random.random()
        # logging's lock (taken by its before-fork hook when that runs) must be free
        # for another thread of the child (a thread-pool worker that logs, say)
        got = []
        def take():
            got.append(logging._lock.acquire(timeout=2))
            if got[-1]:
                logging._lock.release()
        t = threading.Thread(target=take)
        t.start(); t.join()
        msg["logging_lock_free"] = got == [True]
        r, w = os.pipe()
        pid = os.fork()  # the daemon's own fork (a session, say)
        if pid == 0:
            os.write(w, str(id(threading._active_limbo_lock)).encode()); os._exit(0)
        os.waitpid(pid, 0)
        msg["grandchild_limbo_lock"] = int(os.read(r, 100))
        os.write(fd, json.dumps(msg).encode())
        os._exit(0)

    def fork(as_daemon=True):
        r, w = os.pipe()
        python_calls.clear()
        sys.setprofile(watch)
        pid = forkserver._fork()  # as the fork-server forks (double-fork path)
        sys.setprofile(None)
        if pid == 0:
            child_report(w, as_daemon)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        child = json.loads(data)
        child["hooks_in_parent"] = list(python_calls)
        return child

    forkserver.AT_FORK.find()
    parent = {"limbo_lock": id(threading._active_limbo_lock),
              "lean": forkserver.AT_FORK.use_lean()}  # what serve() does first
    daemons = [fork(), fork()]
    raw = [fork(as_daemon=False), fork(as_daemon=False)]
    parent["still_lean"] = forkserver.AT_FORK.lean
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    threaded = fork()  # another thread might hold a lock: every hook runs from now on
    stop.set(); worker.join()
    parent["lean_after_thread"] = forkserver.AT_FORK.lean

    forkserver.AT_FORK.find()  # a hook registered after find(): nothing is left out
    os.register_at_fork(after_in_child=lambda: ran.append(1))
    parent["lean_with_unknown"] = forkserver.AT_FORK.use_lean()
    unknown = fork()
    print(json.dumps({"parent": parent, "daemons": daemons, "raw": raw,
                      "threaded": threaded, "unknown": unknown}))
"""


def test_daemons_are_forked_without_the_python_fork_hooks() -> None:
    data = _run(AT_FORK)
    parent, daemons, raw = data["parent"], data["daemons"], data["raw"]
    assert parent["lean"] and parent["still_lean"]  # installed once, kept while serving
    for child in daemons + raw:
        assert child["hooks_in_parent"] == []  # logging's lock is not taken and released
        assert child["hooks_in_child"] == []  # no Python code runs in the child either...
        assert child["limbo_lock"] == parent["limbo_lock"]  # (threading's hook did not run)
        assert child["logging_lock_free"]  # ...yet logging's lock is usable
    for child in daemons:
        assert child["grandchild_limbo_lock"] != parent["limbo_lock"]  # a daemon's own forks run every hook
    assert raw[0]["random"] == raw[1]["random"]  # random's hook did not run either...
    assert daemons[0]["random"] != daemons[1]["random"]  # ...so each daemon reseeds itself


def test_every_hook_runs_when_the_server_has_threads_or_an_unknown_hook() -> None:
    data = _run(AT_FORK)
    parent, threaded, unknown = data["parent"], data["threaded"], data["unknown"]
    assert not parent["lean_after_thread"]
    assert "_after_fork" in threaded["hooks_in_child"]  # threading's hook ran
    assert "_acquireLock" in threaded["hooks_in_parent"]
    assert threaded["limbo_lock"] != parent["limbo_lock"]
    assert not parent["lean_with_unknown"]
    assert unknown["extra_hook_ran"]
    assert unknown["limbo_lock"] != parent["limbo_lock"]


def test_hot_code_leaves_out_what_runs_in_a_marked_context_and_puts_back_a_tracer() -> None:
    import asyncio
    import contextvars

    from agentctl_swarm import forkserver

    scaffold: contextvars.ContextVar[bool] = contextvars.ContextVar("scaffold", default=False)

    def ours() -> int:
        return 1

    def theirs() -> int:
        return 2

    async def marked_task() -> None:
        asyncio.get_running_loop().call_soon(theirs)  # the callback inherits the mark
        await asyncio.sleep(0)

    async def main() -> None:
        marked = contextvars.copy_context()
        marked.run(scaffold.set, True)
        await asyncio.create_task(marked_task(), context=marked)
        ours()

    def other_tracer(frame, event, arg) -> None:
        return None

    previous = sys.gettrace()  # a coverage tool's, if any
    sys.settrace(other_tracer)
    try:
        hot = forkserver.hot_code(lambda: asyncio.run(main()), unless=scaffold)
        assert sys.gettrace() is other_tracer
    finally:
        sys.settrace(previous)
    assert ours.__code__ in hot and main.__code__ in hot
    assert theirs.__code__ not in hot and marked_task.__code__ not in hot
    assert forkserver.hot_code(theirs) == {theirs.__code__}  # no mark: everything


FUNCTIONS = """
    import json
    from agentctl_swarm import forkserver

    class Thing:
        def method(self):
            return "method"

        @property
        def prop(self):
            return "prop"

        @staticmethod
        def static():
            return "static"

        def cold(self):
            return "cold"

    def hot():
        return "hot"

    async def coro():
        return "coro"

    originals = {"hot": hot, "method": Thing.method, "prop": Thing.prop.fget,
                 "static": Thing.__dict__["static"].__func__, "cold": Thing.cold, "coro": coro}
    hot_set = forkserver.hot_code(lambda: (hot(), Thing().method(), Thing().prop, Thing.static(),
                                          coro().close()))
    moved = forkserver.pack_functions(hot_set)
    made = coro()
    made.close()
    thing = Thing()
    print(json.dumps({
        "moved": moved,
        "replaced": {name: forkserver._CLONES.get(func) is not None and
                     forkserver._CLONES[func] is not func for name, func in originals.items()},
        "named": {"hot": hot is forkserver._CLONES[originals["hot"]],
                  "method": Thing.method is forkserver._CLONES[originals["method"]],
                  "prop": Thing.prop.fget is forkserver._CLONES[originals["prop"]],
                  "static": Thing.static is forkserver._CLONES[originals["static"]]},
        "work": [hot(), thing.method(), thing.prop, Thing.static(), thing.cold()],
        "same_name": hot.__qualname__ == originals["hot"].__qualname__,
        "name_copied": hot.__qualname__ is not originals["hot"].__qualname__
                       and coro.__name__ is not originals["coro"].__name__
                       and made.__qualname__ is coro.__qualname__,  # what a coroutine holds
        "shares": hot.__code__ is originals["hot"].__code__
                  and hot.__globals__ is originals["hot"].__globals__,
    }))
"""


def test_pack_functions_puts_copies_where_modules_and_classes_name_them() -> None:
    data = _run(FUNCTIONS)
    assert data["moved"] == 5  # hot, coro, method, prop, static
    replaced = data["replaced"]
    assert replaced == {"hot": True, "method": True, "prop": True, "static": True, "cold": False,
                        "coro": True}
    assert all(data["named"].values()), data["named"]
    assert data["work"] == ["hot", "method", "prop", "static", "cold"]
    assert data["same_name"] and data["name_copied"]  # equal names, new strings (packed too)
    assert data["shares"]  # a copy runs the same code in the same module


def test_preload_keeps_the_fork_hooks_findable_and_packs_the_fork_path() -> None:
    data = _run("""
        import json
        from agentctl_swarm import daemon, forkserver, spawner
        from agentctl_swarm.agentchat import relay
        forkserver.preload()
        packed = set(forkserver._PACKED)
        print(json.dumps({
            "lean": forkserver.AT_FORK.use_lean(),  # the hooks it finds by identity were left alone
            "fork_path": spawner.apply_in_child.__code__ in forkserver._PACKED.values(),
            "daemon_main": daemon.main_forked.__code__ in forkserver._PACKED.values(),
            "relay_left": not any(code.co_filename == relay.__file__ for code in packed),
            "clones": len(forkserver._CLONES),
            "rehearsal_still_boots": daemon.rehearse(1),
        }))
    """)
    assert data["lean"]
    assert data["fork_path"] and data["daemon_main"]  # never rehearsed, packed all the same
    assert data["relay_left"]  # the rehearsal's scaffold is not packed with the daemons' code
    assert data["clones"] >= 200
    assert data["rehearsal_still_boots"] == 1
