"""The harness's own checks: the measurement sees a child's memory, the checker rejects wrong merges."""

from __future__ import annotations

import sys

import pytest

from benchmarks.book import Book, Row
from benchmarks.check import check_negated_mean
from benchmarks.measure import measure
from benchmarks.tools import command, ensure_checkpoints, unavailable


def test_measure_reports_the_child_peak_not_the_parent():
    small = measure([sys.executable, "-c", "pass"])
    big = measure([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert big.max_rss_bytes - small.max_rss_bytes > 280 * 2**20
    assert small.wall_s > 0


def test_measure_raises_with_the_child_stderr():
    with pytest.raises(RuntimeError, match="boom"):
        measure([sys.executable, "-c", "import sys; sys.exit('boom')"])


def test_check_rejects_a_merge_with_the_wrong_scale(tmp_path):
    reason = unavailable("taskvec")
    if reason:
        pytest.skip(reason)
    inputs = ensure_checkpoints(tmp_path, "tiny", "float32", 2)
    output = tmp_path / "out"
    measure(command("taskvec", inputs, 0.5, output, tmp_path))
    assert check_negated_mean(output, inputs.base, inputs.finetuned, 0.5).worst_error_over_bound <= 1
    with pytest.raises(AssertionError, match="off the float64 reference"):
        check_negated_mean(output, inputs.base, inputs.finetuned, 0.6)
    with pytest.raises(AssertionError, match="off the float64 reference"):
        check_negated_mean(output, inputs.base, inputs.finetuned[:1], 0.5)


def test_book_relates_the_gpu_merge_to_reading_the_inputs():
    book = Book("full")
    case = "gpt2-float32-N5"
    read_write = Row(case, "read+write", walls_s=[3.0], extra={"read_s": 2.0, "write_s": 1.0})
    for row in (Row(case, "import taskvec", walls_s=[0.5]), read_write,
                Row(case, "taskvec", walls_s=[6.0, 5.0, 7.0], rss_bytes=[300 * 2**20]),
                Row(case, "taskvec-cuda", walls_s=[2.5, 2.4, 3.0])):
        book.add(row)
    summary = book.case_summary(case)
    assert summary["cuda_read_ratio"] == pytest.approx(2.5 / 2.0)
    assert summary["cuda_speedup"] == pytest.approx(6.0 / 2.5)
    assert summary["floor_ratio"] == pytest.approx(6.0 / 3.5)
    assert "| gpt2-float32-N5 | 2.50 | 1.25x | 2.40x |" in book.markdown()
    assert "cuda_read_ratio" not in Book("full").case_summary(case)
