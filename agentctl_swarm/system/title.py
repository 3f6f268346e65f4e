"""Process titles, so ``ps`` and ``top`` show which daemon is which.

Daemons forked by the fork-server would otherwise all show the fork-server's
command line. ``setproctitle`` rewrites the whole title; without it only the
15-byte ``comm`` name can be set (``PR_SET_NAME``).
"""

from __future__ import annotations

import ctypes

try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - optional dependency
    _setproctitle = None

_PR_SET_NAME = 15


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle(title)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)
