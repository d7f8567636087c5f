"""Benchmark options, the checkpoint sets the merges run on, and the end-of-run report.

Sizes: `quick` (the default, run by CI with the rest of the suite: tiny shapes, each body once
as a test; safetensors, .bin and LoRA inputs), `full` (gpt2 and gpt2-medium shapes, N = 1, 5,
16, a few rounds each; .bin and LoRA inputs at gpt2 N=5) and `xl`
(one gpt2-xl-shaped fp32 merge of N=5, about 36 GB of input: opt-in, needs ~45 GB of disk).
Choose with `--bench-size` or the TASKVEC_BENCH environment variable. Non-quick sizes turn
pytest-benchmark's timing on (pyproject's addopts disable it for the test suite).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from benchmarks.book import Book
from benchmarks.tools import ensure_checkpoints

SIZES = ("quick", "full", "xl")
BOOK_KEY = pytest.StashKey[Book]()


def pytest_addoption(parser):
    group = parser.getgroup("taskvec benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=os.environ.get("TASKVEC_BENCH", "quick"),
                    help="quick (CI), full (gpt2..gpt2-medium) or xl (gpt2-xl, >RAM). Env: TASKVEC_BENCH.")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="Rounds per end-to-end measurement [default: 1 quick, 3 otherwise].")
    group.addoption("--bench-dir", default=os.environ.get("TASKVEC_BENCH_DIR"),
                    help="Where full/xl checkpoint sets are generated and kept between runs "
                         "[default: $TMPDIR/taskvec-bench]. Env: TASKVEC_BENCH_DIR.")
    group.addoption("--bench-report", default=".benchmarks",
                    help="Directory for the session's table (taskvec-bench-SIZE.md and .json).")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("--bench-size", "quick") != "quick":
        config.option.benchmark_enable = True  # before pytest-benchmark reads it
    config.stash[BOOK_KEY] = Book(config.getoption("--bench-size", "quick"))


def pytest_terminal_summary(terminalreporter, config):
    book = config.stash.get(BOOK_KEY, None)
    if book is None or not (book.rows or book.ops):
        return
    path = book.save(Path(config.getoption("--bench-report")))
    terminalreporter.write_sep("=", "taskvec benchmark table")
    terminalreporter.write(book.markdown())
    terminalreporter.write_line(f"(saved to {path} and {path.with_suffix('.json')})")


@pytest.fixture(scope="session")
def bench_size(pytestconfig) -> str:
    return pytestconfig.getoption("--bench-size")


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_size) -> int:
    rounds = pytestconfig.getoption("--bench-rounds")
    return rounds if rounds else (1 if bench_size == "quick" else 3)


@pytest.fixture(scope="session")
def book(pytestconfig) -> Book:
    return pytestconfig.stash[BOOK_KEY]


@pytest.fixture(scope="session")
def checkpoints(pytestconfig, bench_size, tmp_path_factory):
    """(size, dtype, n, format) -> Inputs: a synthetic base and n fine-tunes (or LoRA adapters).

    Quick sets live in pytest's temporary directory. Bigger ones are generated once into
    --bench-dir and kept between runs, since a gpt2-medium set takes minutes to write.
    """
    if bench_size == "quick":
        root = tmp_path_factory.mktemp("bench-checkpoints")
    else:
        root = Path(pytestconfig.getoption("--bench-dir") or Path(tempfile.gettempdir()) / "taskvec-bench")
    return lambda size, dtype, n, format="safetensors": ensure_checkpoints(root, size, dtype, n, format)
