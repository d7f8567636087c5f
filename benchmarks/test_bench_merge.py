"""End to end: `taskvec merge` against the original approach and mergekit, with the machine's floor.

For each case (a checkpoint set), in order, each starting with the inputs read once into the
page cache where they fit (warm-cache timings; the xl set cannot fit): the floor measurements (a fresh `import torch`, a
fresh import of taskvec's merge command, reading every input once plus writing one output),
then each merge tool as a subprocess (taskvec only for the .bin and LoRA cases, which follow the
safetensors case of the same weights), its wall time and peak RSS measured by a fresh wrapper
process (benchmarks/measure.py). Every tool's output is checked against a float64 reference.
The session ends with a table of medians and ratios (see benchmarks/README.md).
"""

from __future__ import annotations

import shutil
import statistics

import pytest

from benchmarks.baselines import (
    IMPORT_STATEMENTS,
    import_command,
    physical_memory,
    read_once,
    weights_bytes,
    write_once,
)
from benchmarks.book import Row
from benchmarks.check import check_negated_mean
from benchmarks.measure import measure
from benchmarks.tools import MERGERS, Case, command, unavailable

CASES = {
    "quick": [Case("tiny", 2), Case("tiny", 2, format="bin"), Case("tiny", 2, format="lora")],
    # the comparison first, the same merge from .bin and from LoRA adapters, then scaling in N
    # (same set) and in model size
    "full": [Case("gpt2", 5), Case("gpt2", 5, format="bin"), Case("gpt2", 5, format="lora"),
             Case("gpt2", 1), Case("gpt2", 16), Case("tiny", 5), Case("gpt2-medium", 5)],
    "xl": [Case("gpt2-xl", 5)],
}
XL_TOOLS = ("import taskvec", "read+write", "taskvec", "taskvec-cuda")  # the others would need 5x RAM


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    runs = [(case, tool) for case in CASES[size]  # case-major: warm cache per case
            for tool in (XL_TOOLS if size == "xl" else case.tools)]
    metafunc.parametrize(("case", "tool"), runs, ids=[f"{c.id}-{t.replace(' ', '_')}" for c, t in runs])


def test_merge(case, tool, benchmark, checkpoints, bench_rounds, book):
    reason = unavailable(tool)
    if reason:
        pytest.skip(reason)
    inputs = checkpoints(case.size, case.dtype, case.n, case.format)
    workdir = inputs.finetuned[0].parent / "bench-work"  # per set (a LoRA set shares its base)
    workdir.mkdir(exist_ok=True)
    row = Row(case.id, tool)
    benchmark.group = case.id
    benchmark.extra_info["case"] = case.id
    if sum(weights_bytes(d) for d in inputs.directories) < physical_memory() // 2:
        read_once(inputs.directories)  # warm-cache timings, where the inputs fit in the page cache
    if tool == "read+write":
        _read_write_rounds(benchmark, inputs, workdir, bench_rounds, row)
    else:
        output = workdir / f"out-{tool}"
        if tool in IMPORT_STATEMENTS:
            argv = import_command(IMPORT_STATEMENTS[tool])
        else:
            argv = command(tool, inputs, case.scale, output, workdir)
        _command_rounds(benchmark, argv, output, bench_rounds, row)
        if tool in MERGERS:
            checked = check_negated_mean(output, inputs.base, inputs.finetuned, case.scale)
            benchmark.extra_info["max_abs_error"] = checked.max_abs_error
            benchmark.extra_info["error_over_bound"] = checked.worst_error_over_bound
            shutil.rmtree(output)
    benchmark.extra_info["median_wall_s"] = row.wall_s
    benchmark.extra_info["peak_rss_mib"] = row.rss_mib
    book.add(row)


def _read_write_rounds(benchmark, inputs, workdir, rounds, row) -> None:
    """The floor's I/O part: read every input file once, write one output-sized file."""
    out_bytes = weights_bytes(inputs.base)
    reads, writes = [], []

    def target():
        read_s, total = read_once(inputs.directories)
        write_s = write_once(workdir / "write-baseline.bin", out_bytes)
        reads.append(read_s)
        writes.append(write_s)
        row.walls_s.append(read_s + write_s)
        assert total >= sum(weights_bytes(d) for d in inputs.directories)

    benchmark.pedantic(target, rounds=rounds)
    row.extra.update(read_s=statistics.median(reads), write_s=statistics.median(writes))


def _command_rounds(benchmark, argv, output, rounds, row) -> None:
    """Rounds of one command, each in a fresh wrapper process, from an absent `output`."""
    def target():
        measured = measure(argv)
        row.walls_s.append(measured.wall_s)
        row.rss_bytes.append(measured.max_rss_bytes)

    benchmark.pedantic(target, setup=lambda: shutil.rmtree(output, ignore_errors=True), rounds=rounds)
