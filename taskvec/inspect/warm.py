"""Loading the CPU pass's compiled loops on a thread, beside torch's import and the planning.

numba's import and the loading of its cached loops take about a second, most of it Python work
on the GIL: on two cores it runs beside torch's import instead of after the planning, so that the
pass finds the loops loaded.
"""

from __future__ import annotations

import threading

THREAD_NAME = "taskvec-inspect-warm-up"


def start() -> None:
    """Start loading the loops; the pass waits for the loading where it is not done (numba's
    lock), and raises any error. Not a daemon: should the command fail before its pass, the
    interpreter waits for the loading to end (a second or so) instead of finalizing around it,
    which can abort the process ("terminate called without an active exception", status 134)."""
    threading.Thread(target=_load, name=THREAD_NAME).start()


def _load() -> None:
    try:
        from taskvec.inspect.loops import warm_up

        warm_up()
    except Exception:  # noqa: BLE001 - the pass reports it, with its context
        pass
