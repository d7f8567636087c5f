"""The shared job I/O (taskvec/stream/jobs.py): WriteBehind's ordering, slots, release and errors;
Prefetcher's page-locked buffers."""

import errno
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from taskvec.stream.jobs import Prefetcher, WriteBehind


class SlowWriter:
    """Records (job, first byte, thread) once each write has finished, after `delay` seconds."""

    def __init__(self, log, delay=0.0, fail_on=None):
        self.log, self.delay, self.fail_on = log, delay, fail_on

    def write_job(self, job, buffer):
        time.sleep(self.delay)
        if job == self.fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.log.append((job, int(buffer[0]), threading.current_thread().name))


def writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("taskvec-write")]


def test_writes_run_in_order_on_one_thread_and_a_slot_waits_for_its_write():
    log, released = [], []
    buffers = [torch.full((4,), k, dtype=torch.uint8) for k in range(2)]
    with WriteBehind([SlowWriter(log, delay=0.02)]) as writes:
        writes.submit("job0", [buffers[0]], slot=0)
        writes.submit("job1", [buffers[1]], slot=1)
        assert log == []  # submit returns before the write is done
        writes.wait(0)
        assert [entry[0] for entry in log] == ["job0"]  # slot 0's buffer is free again
        buffers[0].fill_(7)
        writes.submit("job2", [buffers[0]], slot=0)
        writes.submit("copy", [buffers[1]], release=lambda: released.append(threading.current_thread().name))
    assert [(job, first) for job, first, _ in log] == [("job0", 0), ("job1", 1), ("job2", 7), ("copy", 1)]
    assert {name.rsplit("_", 1)[0] for *_, name in log} == {"taskvec-write"}
    assert [name.rsplit("_", 1)[0] for name in released] == ["taskvec-write"]  # after the write, on its thread
    assert not writer_threads()


def test_a_write_error_reaches_the_caller_and_the_thread_stops():
    log = []
    buffer = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(OSError, match="No space left"):
        with WriteBehind([SlowWriter(log, fail_on="job1")]) as writes:
            writes.submit("job0", [buffer], slot=0)
            writes.submit("job1", [buffer], slot=1)
            writes.wait(0)
            writes.wait(1)  # raises the writer thread's error here
            pytest.fail("the write error was not raised")
    assert not writer_threads()
    released = []
    with pytest.raises(OSError, match="No space left"):  # an unslotted write's error: at the exit
        with WriteBehind([SlowWriter(log, fail_on="copy")]) as writes:
            writes.submit("copy", [buffer], release=lambda: released.append(True))
    assert released == [True]  # buffers go back even when the write fails
    with pytest.raises(KeyError):  # another error on its way: the pending write's error stays quiet
        with WriteBehind([SlowWriter(log, delay=0.02, fail_on="job3")]) as writes:
            writes.submit("job3", [buffer], slot=0)
            raise KeyError("first")
    assert not writer_threads()


def test_prefetcher_buffers_are_page_locked_only_when_asked():
    job = SimpleNamespace()

    class Reader:
        def read_job(self, job, index, buffer):
            buffer.fill_(index)

    plain = Prefetcher(Reader(), [(job, 0), (job, 1)], 16, buffers=2)
    try:
        first, second = plain.take(), plain.take()
        assert (int(first[0]), int(second[0])) == (0, 1)
        assert not first.is_pinned() and not second.is_pinned()
    finally:
        plain.close()
    if torch.cuda.is_available():
        pinned = Prefetcher(Reader(), [(job, 0)], 16, buffers=2, pin=True)
        try:
            assert pinned.take().is_pinned()
        finally:
            pinned.close()
