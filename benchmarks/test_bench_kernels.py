"""GPU benchmark of the fused kernel: bandwidth as a fraction of a device-to-device copy.

CUDA only (skipped otherwise). For N = 5 fine-tunes of 8, 64 and 256 MB tensors in bfloat16 and
float32, three bodies are timed with pytest-benchmark in one group per case:

* copy:  `dst.copy_(src)` of one tensor, moving 2 x bytes: the practical bandwidth ceiling;
* fused: `combine_triton`, moving (N + 2) x bytes (N + 1 reads, one write);
* torch: the unfused `base - scale * (torch.stack(fts).float().mean(0) - base)`, cast back to
  the input dtype, as a user would write it.

Each round runs ITERS launches then synchronises, so launch and sync overheads are amortised;
the table's times are per round (ITERS launches). `extra_info` of each result holds the time
per launch and GB/s; the fused result also holds its fraction of the copy bandwidth and its
speed-up over torch, both measured in the same run with CUDA events. Run (see docs/kernels.md):

    pytest benchmarks/test_bench_kernels.py --benchmark-enable -m cuda
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N = 5
SCALE = 1.0
ITERS = 10
ROUNDS = 10
MEGABYTES = [8, 64, 256]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _inputs(dtype, megabytes):
    numel = megabytes * 2**20 // dtype.itemsize
    generator = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(numel, device="cuda", generator=generator).to(dtype)
    return base, [(base + 0.01 * torch.randn_like(base, dtype=torch.float32)).to(dtype) for _ in range(N)]


def _bodies(base, fts):
    from taskvec.kernels.combine import combine_triton, pointer_table

    table = pointer_table(fts)
    out = torch.empty_like(base)
    copy_dst = torch.empty_like(base)
    return {
        "copy": (lambda: copy_dst.copy_(base), 2),
        "fused": (lambda: combine_triton(base, fts, 1 + SCALE, -SCALE / N, out=out, table=table), N + 2),
        "torch": (lambda: (base - SCALE * (torch.stack(fts).float().mean(0) - base)).to(base.dtype), N + 2),
    }


def _event_seconds(body) -> float:
    """Median seconds per launch over ROUNDS rounds of ITERS launches, by CUDA events."""
    times = []
    for _ in range(ROUNDS + 1):  # the first round warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ITERS):
            body()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / ITERS)
    return sorted(times[1:])[ROUNDS // 2]


@pytest.mark.parametrize("megabytes", MEGABYTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("body", ["copy", "fused", "torch"])
def test_bench_kernel(benchmark, body, dtype, megabytes):
    base, fts = _inputs(DTYPES[dtype], megabytes)
    bodies = _bodies(base, fts)
    fn, tensors_moved = bodies[body]

    def rounds():
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"kernels {dtype} {megabytes}MB N={N}"
    benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.disabled:
        return
    seconds = _event_seconds(fn)
    nbytes = base.numel() * base.element_size()
    info = {"ms_per_launch": seconds * 1e3, "GBps": tensors_moved * nbytes / seconds / 1e9}
    if body == "fused":
        copy_fn, copy_moved = bodies["copy"]
        copy_gbps = copy_moved * nbytes / _event_seconds(copy_fn) / 1e9
        info.update(copy_GBps=copy_gbps, fraction_of_copy=info["GBps"] / copy_gbps,
                    speedup_vs_torch=_event_seconds(bodies["torch"][0]) / seconds)
    benchmark.extra_info.update(info)
    print(f"\n{body} {dtype} {megabytes}MB: " + ", ".join(f"{k}={v:.3g}" for k, v in info.items()))
