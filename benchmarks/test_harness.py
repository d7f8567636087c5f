"""The harness's own checks: the measurement sees a child's memory, the checker rejects wrong merges."""

from __future__ import annotations

import sys

import pytest

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
