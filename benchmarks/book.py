"""Results of one benchmark session, and the tables and target checks made from them.

Ratios are only taken between numbers measured in the same session: absolute times on a
shared machine drift from run to run, ratios much less.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.baselines import physical_memory

MIB = 2**20
TARGETS = {
    "floor_ratio": 1.5,  # taskvec wall <= 1.5 x (import taskvec + read inputs + write output)
    "mergekit_speedup": 3.0,  # mergekit wall / taskvec wall >= 3
    "rss_mib": 600,  # taskvec peak RSS
    "rss_flat_in_n": 1.10,  # taskvec RSS at N=16 / N=5
    "xl_rss_mib": 2048,  # bigger-than-RAM merge
    "bin_rss_ratio": 1.5,  # taskvec RSS from .bin inputs / from safetensors inputs (issue 11)
}
FORMAT_SUFFIXES = ("-bin", "-lora")  # case ids of the .bin and LoRA cases (benchmarks.tools.Case.id)


def safetensors_case(case: str) -> str | None:
    """The safetensors case a .bin or LoRA case is read against, or None for a safetensors case."""
    return next((case.removesuffix(s) for s in FORMAT_SUFFIXES if case.endswith(s)), None)


@dataclass
class Row:
    case: str
    tool: str
    walls_s: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls_s)

    @property
    def rss_mib(self) -> float | None:
        return max(self.rss_bytes) / MIB if self.rss_bytes else None


@dataclass
class Book:
    size: str
    rows: list[Row] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)

    def row(self, case: str, tool: str) -> Row | None:
        return next((r for r in self.rows if r.case == case and r.tool == tool), None)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    # --- derived -------------------------------------------------------------------------------

    def case_summary(self, case: str) -> dict:
        """Ratios for one case, from whichever of its rows were measured."""
        get = self.row
        out = {}
        taskvec, rw, imp = get(case, "taskvec"), get(case, "read+write"), get(case, "import taskvec")
        sibling = safetensors_case(case)
        if sibling and imp is None:  # the same import, measured once in the safetensors case
            imp = get(sibling, "import taskvec")
        if taskvec and rw and imp:
            floor = imp.wall_s + rw.extra["read_s"] + rw.extra["write_s"]
            out["floor_s"] = floor
            out["floor_ratio"] = taskvec.wall_s / floor
        for other in ("original", "mergekit"):
            row = get(case, other)
            if taskvec and row:
                out[f"{other}_speedup"] = row.wall_s / taskvec.wall_s
                out[f"{other}_rss_ratio"] = row.rss_mib / taskvec.rss_mib
        if taskvec:
            out["rss_mib"] = taskvec.rss_mib
        reference = get(sibling, "taskvec") if sibling else None
        if taskvec and reference:  # this format against safetensors inputs, same run
            out["vs_safetensors_time"] = taskvec.wall_s / reference.wall_s
            out["vs_safetensors_rss"] = taskvec.rss_mib / reference.rss_mib
        cuda = get(case, "taskvec-cuda")
        if cuda and rw:  # the GPU figure: the whole merge against just reading the inputs
            out["cuda_read_ratio"] = cuda.wall_s / rw.extra["read_s"]
        if cuda and taskvec:
            out["cuda_speedup"] = taskvec.wall_s / cuda.wall_s
        return out

    def rss_flatness(self) -> list[tuple[str, str, float]]:
        """(N=5 case, N=16 case, RSS ratio) for every size measured at both."""
        found = []
        for row in self.rows:
            if row.tool == "taskvec" and row.case.endswith("-N16"):
                five = self.row(row.case[:-len("N16")] + "N5", "taskvec")
                if five:
                    found.append((five.case, row.case, row.rss_mib / five.rss_mib))
        return found

    # --- output --------------------------------------------------------------------------------

    def markdown(self) -> str:
        lines = [f"Machine: {machine()}", f"Size: `{self.size}`", ""]
        if self.rows:
            lines += ["| case | tool | median wall (s) | peak RSS (MiB) | rounds |",
                      "|---|---|---:|---:|---:|"]
            for r in self.rows:
                rss = f"{r.rss_mib:.0f}" if r.rss_mib is not None else ""
                detail = ""
                if r.tool == "read+write":
                    detail = f" (read {r.extra['read_s']:.2f} + write {r.extra['write_s']:.2f})"
                lines.append(f"| {r.case} | {r.tool} | {r.wall_s:.2f}{detail} | {rss} | {len(r.walls_s)} |")
            lines += ["", "| case | taskvec / floor | mergekit / taskvec (time) | original / taskvec (time) "
                          "| taskvec RSS (MiB) | mergekit / taskvec (RSS) | original / taskvec (RSS) |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for case in dict.fromkeys(r.case for r in self.rows):
                s = self.case_summary(case)
                cells = [_fmt(s.get(k), "x") for k in ("floor_ratio", "mergekit_speedup", "original_speedup")]
                cells.append(_fmt(s.get("rss_mib"), "", 0))
                cells += [_fmt(s.get(k), "x") for k in ("mergekit_rss_ratio", "original_rss_ratio")]
                lines.append(f"| {case} | " + " | ".join(cells) + " |")
            cuda_cases = [c for c in dict.fromkeys(r.case for r in self.rows) if self.row(c, "taskvec-cuda")]
            if cuda_cases:
                lines += ["", "| case | taskvec --device cuda (s) | cuda / read inputs | cpu / cuda (time) |",
                          "|---|---:|---:|---:|"]
                for case in cuda_cases:
                    s = self.case_summary(case)
                    lines.append(f"| {case} | {self.row(case, 'taskvec-cuda').wall_s:.2f} | "
                                 f"{_fmt(s.get('cuda_read_ratio'), 'x')} | {_fmt(s.get('cuda_speedup'), 'x')} |")
            format_cases = [c for c in dict.fromkeys(r.case for r in self.rows)
                            if "vs_safetensors_time" in self.case_summary(c)]
            if format_cases:
                lines += ["", "| case | against | taskvec (s) | safetensors (s) | time ratio | taskvec RSS (MiB) "
                              "| safetensors RSS (MiB) | RSS ratio |",
                          "|---|---|---:|---:|---:|---:|---:|---:|"]
                for case in format_cases:
                    s, sibling = self.case_summary(case), safetensors_case(case)
                    this, ref = self.row(case, "taskvec"), self.row(sibling, "taskvec")
                    lines.append(f"| {case} | {sibling} | {this.wall_s:.2f} | {ref.wall_s:.2f} "
                                 f"| {_fmt(s['vs_safetensors_time'], 'x')} | {this.rss_mib:.0f} "
                                 f"| {ref.rss_mib:.0f} | {_fmt(s['vs_safetensors_rss'], 'x')} |")
            for five, sixteen, ratio in self.rss_flatness():
                lines.append(f"\ntaskvec peak RSS {sixteen} / {five}: {ratio:.3f}")
        if self.ops:
            lines += ["", "| device | dtype | N | elements | taskvec GB/s | unfused GB/s | taskvec / unfused "
                          "| taskvec / copy | copy GB/s |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for key in dict.fromkeys((o["device"], o["dtype"], o["n"], o["numel"]) for o in self.ops):
                both = {o["impl"]: o for o in self.ops if (o["device"], o["dtype"], o["n"], o["numel"]) == key}
                tv, un = both.get("taskvec"), both.get("unfused")
                ratio = tv["gbps"] / un["gbps"] if tv and un else None
                lines.append(
                    f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_fmt(tv and tv['gbps'], '', 1)} "
                    f"| {_fmt(un and un['gbps'], '', 1)} | {_fmt(ratio, 'x')} "
                    f"| {_fmt(tv and tv['fraction_of_copy'], '', 2)} | {_fmt((tv or un)['copy_gbps'], '', 1)} |"
                )
        return "\n".join(lines) + "\n"

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"taskvec-bench-{self.size}"
        data = {"machine": machine(), "size": self.size, "targets": TARGETS,
                "rows": [asdict(r) | {"wall_s": r.wall_s, "rss_mib": r.rss_mib} for r in self.rows],
                "cases": {c: self.case_summary(c) for c in dict.fromkeys(r.case for r in self.rows)},
                "rss_flatness": self.rss_flatness(), "ops": self.ops}
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        stem.with_suffix(".md").write_text(self.markdown())
        return stem.with_suffix(".md")


def _fmt(value, suffix: str, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def machine() -> str:
    memory = physical_memory() / 2**30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"
            f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}")
