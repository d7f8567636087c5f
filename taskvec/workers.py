"""Worker processes for independent CPU work: a demo's fine-tunes, a sweep's evaluations.

A small model gains little from a second torch thread, and loses a lot when the cores are busy
with other work (threads wait for each other at every operation: on the 2-core development
machine two threads trained the demo's model several times slower than one). Independent pieces
of work in single-threaded processes instead run side by side when a core is free and merely
take turns when not. The workers fork from a server process that imported the heavy modules
once (multiprocessing's forkserver), so a worker is ready in a fraction of a second instead of
importing torch and transformers itself (about 10 s of CPU), and none inherits the caller's
threads or state. Tasks must be picklable: module-level functions and plain arguments.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

from taskvec.errors import TaskvecError


def default_workers(limit: int = 2) -> int:
    """The CPUs this process may run on, at most `limit`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(limit, cpus))


@contextmanager
def worker_pool(workers: int, *, threads: int | None = 1, preload: Sequence[str] = ()) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` processes, each with `threads` torch threads (None: torch's default).

    preload: modules the fork server imports once, before any worker forks from it (only the
    first pool of a process starts the server; later ones share it). The workers start at once,
    in the background: entering the block does not wait for the server's imports. On leaving
    the block the pool waits for its running tasks; after an error (or Ctrl-C) it first cancels
    the tasks not yet started.
    """
    if workers < 1:
        raise TaskvecError(f"workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise TaskvecError(f"threads must be at least 1, got {threads}")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["taskvec.workers", *preload])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,))
    # Starting a process waits for the fork server to finish its imports: that happens on a
    # thread, so the caller goes on with its own work (its own imports, say) meanwhile.
    starter = threading.Thread(target=_start_processes, args=(pool, workers), name="taskvec-workers", daemon=True)
    starter.start()
    try:
        yield pool
    except BaseException:
        starter.join()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    starter.join()
    pool.shutdown(wait=True)


def in_order(futures: Sequence[Future]) -> Iterator:
    """The futures' results in order, each as soon as it is there; on the first error (or if the
    caller stops early) the ones not yet started are cancelled."""
    try:
        for future in futures:
            yield future.result()
    finally:
        for future in futures:
            future.cancel()  # a no-op for a finished or running one


def results(futures: Sequence[Future]) -> list:
    """The futures' results in order; on the first error the ones not yet started are cancelled."""
    return list(in_order(futures))


def _start_processes(pool: ProcessPoolExecutor, workers: int) -> None:
    for _ in range(workers):  # the pool starts a process per task until it has `workers`
        pool.submit(os.getpid)


def _start_worker(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
