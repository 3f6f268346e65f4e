"""Run a test body in a forked child: for what cannot be undone in the test process
(Landlock, PR_SET_PDEATHSIG, dropped limits)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable


def in_fork(body: Callable[[int], object]) -> object:
    """Run ``body(result_fd)`` in a forked child and return what it returned (as JSON)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.write(write_fd, json.dumps(body(write_fd)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)
