"""Loading the CPU pass's compiled loops on a thread, beside torch's import and the planning.

Loading numba and its cached loops takes about a second, most of it Python work that shares the
GIL with torch's import; about half of it is scipy, which numba imports only to check its
version and to learn whether its np.dot may call BLAS. The loops use neither, so the loading
thread is refused scipy (other threads import it as usual): numba then counts on no BLAS, which
changes only how numba-compiled np.correlate and np.convolve sum (a plain loop, the same values).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

THREAD_NAME = "taskvec-inspect-warm-up"


def start() -> None:
    """Start loading the loops; the pass waits for the loading where it is not done (numba's
    lock), and raises any error. Not a daemon: should the command fail before its pass, the
    interpreter waits for the loading to end (a second or so) instead of finalizing around it,
    which can abort the process ("terminate called without an active exception", status 134)."""
    threading.Thread(target=_load, name=THREAD_NAME).start()


def _load() -> None:
    finder = _NoScipyOnThisThread()
    sys.meta_path.insert(0, finder)
    try:
        from taskvec.inspect.loops import warm_up

        warm_up()
    except Exception:  # noqa: BLE001 - the pass reports it, with its context
        pass
    finally:
        sys.meta_path.remove(finder)


class _NoScipyOnThisThread(importlib.abc.MetaPathFinder):
    """Refuses scipy to imports on the thread that made it, while it is on sys.meta_path."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and (name == "scipy" or name.startswith("scipy.")):
            raise ModuleNotFoundError(f"{name} is not imported while taskvec loads its compiled loops", name=name)
        return None
