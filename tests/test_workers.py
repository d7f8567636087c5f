"""taskvec.workers: single-threaded worker processes forked from a preloaded server."""

import os
import time

import pytest
import torch

from taskvec.errors import TaskvecError
from taskvec.workers import default_workers, in_order, results, worker_pool


def test_tasks_run_in_other_processes_with_the_threads_asked_for():
    with worker_pool(2, threads=1, preload=["torch"]) as pool:
        pids = set(results([pool.submit(os.getpid) for _ in range(8)]))
        threads = results([pool.submit(torch.get_num_threads) for _ in range(4)])
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert threads == [1] * 4


def test_the_pool_is_there_before_the_fork_server_has_imported_its_modules(tmp_path):
    """A fresh interpreter (its own fork server) preloading a module that takes 3 s to import."""
    import subprocess
    import sys

    (tmp_path / "slow_module.py").write_text("import time\ntime.sleep(3)\n")
    script = ("import os, time\n"
              "from taskvec.workers import worker_pool\n"
              "started = time.perf_counter()\n"
              "with worker_pool(2, preload=['slow_module']) as pool:\n"
              "    entered = time.perf_counter() - started\n"
              "    pid = pool.submit(os.getpid).result()\n"
              "    done = time.perf_counter() - started\n"
              "print(entered, done, pid != os.getpid())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    entered, done, elsewhere = result.stdout.split()
    assert float(entered) < 1.5 and float(done) >= 3 and elsewhere == "True"


def test_an_error_in_a_worker_comes_back_as_itself():
    from taskvec.data import read_jsonl

    with pytest.raises(TaskvecError, match="no such file"), worker_pool(1) as pool:
        results([pool.submit(read_jsonl, "/nonexistent/texts.jsonl")])


def test_results_cancel_what_has_not_started_after_an_error():
    from taskvec.data import read_jsonl

    with worker_pool(1) as pool:
        futures = [pool.submit(read_jsonl, "/nonexistent/texts.jsonl"), *(pool.submit(time.sleep, 1) for _ in range(8))]
        started = time.perf_counter()
        with pytest.raises(TaskvecError):
            results(futures)
    # the executor hands a worker's queue up to 2 tasks ahead: those can no longer be cancelled
    assert sum(future.cancelled() for future in futures) >= 5
    assert time.perf_counter() - started < 5


def test_in_order_gives_each_result_as_it_comes_and_cancels_the_rest_when_left():
    with worker_pool(1) as pool:
        results([pool.submit(os.getpid)])  # the worker is up
        futures = [pool.submit(time.sleep, 0.5) for _ in range(8)]
        started = time.perf_counter()
        for _ in in_order(futures):
            break
        waited = time.perf_counter() - started
    assert waited < 2 and sum(future.cancelled() for future in futures) >= 4  # up to 3 were handed to the worker


def test_bad_arguments_are_refused():
    with pytest.raises(TaskvecError, match="workers must be at least 1, got 0"), worker_pool(0):
        pass
    with pytest.raises(TaskvecError, match="threads must be at least 1, got 0"), worker_pool(2, threads=0):
        pass


def test_default_workers_is_the_usable_cpus_up_to_the_limit():
    assert default_workers(limit=1) == 1
    assert 1 <= default_workers() <= 2
    assert default_workers(limit=64) == len(os.sched_getaffinity(0))
