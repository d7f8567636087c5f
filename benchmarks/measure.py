"""Wall time and peak RSS of one command, measured by a fresh wrapper process.

`getrusage(RUSAGE_CHILDREN)` in a process that has run exactly one child gives that child's
(and its waited-for descendants') peak resident memory, with no sampling gaps and nothing of
pytest's own memory mixed in. Run as a script it prints one JSON line; `measure()` is the
pytest-side call.

    python benchmarks/measure.py -- taskvec merge --base B -o OUT FT...
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    max_rss_bytes: int


def measure(command: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Run `command` under the wrapper; raise with its stderr if it fails."""
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--", *map(str, command)]
    done = subprocess.run(wrapper, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"wrapper failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["returncode"] != 0:
        raise RuntimeError(
            f"{' '.join(map(str, command))} exited with {report['returncode']}:\n{report['stderr_tail']}"
        )
    return Measurement(report["wall_s"], report["max_rss_bytes"])


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: measure.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    started = time.perf_counter()
    child = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall_s": wall,
        "max_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),  # KiB on Linux
        "returncode": child.returncode,
        "stderr_tail": child.stderr.decode(errors="replace")[-4000:],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
