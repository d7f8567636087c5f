"""The fused non-linear combine (TIES, DARE, dare-ties): K outputs ``base - scale_k * tau`` in one pass.

Each program reads one block of the base and of every fine-tune once and, in registers,

    tau_i = ft_i - base                          (float32)
    DARE:      tau_i = (tau_i * keep_i) / density  keep_i: splitmix64 of (seed, input, tensor, index)
    TIES:      tau_i = tau_i * keep_i              keep_i: |tau_i| above the tensor's exact threshold
    weights:   tau_i = tau_i * w_i
    mean:      tau = (tau_0 + tau_1 + ...) / N     (or / (w_0 + w_1 + ...))
    disjoint:  tau = sum of the tau_i whose sign is that of sum_i tau_i, / their count (or weights)
    out_k = (tau * -scale_k) + base              (then rounded to the output dtype)

op for op what the torch path does (taskvec.methods: sparsify.py, consensus.py, and the general
executor's output step), so the bytes are the same: every operation is an IEEE float32 operation
rounded to nearest, sums run row by row from row 0, and nothing is contracted into a fused
multiply-add (the kernel is compiled with ``enable_fp_fusion=False``; divisions are ``div_rn``,
as Triton's ``/`` is an approximate division on NVIDIA GPUs). The disjoint mean is taken in one
pass: the sums over the positive and over the negative entries are both kept, and the elected
sign picks one, which adds the very terms (zeros included) the torch path adds.

A job is a chunk of packed tensor segments: blocks are aligned to the job (vectorised loads for
the fine-tunes, whose addresses come from a pointer table as in combine.py), and a small
per-block table says which segments a block touches; a block inside one segment and full runs
unmasked. Per-segment inputs (DARE's stream keys, TIES's threshold and how many ties at it are
kept in this chunk) come from the host, which computes them exactly as taskvec.methods.sparsify.

This module imports triton; callers check `taskvec.kernels.triton_available()` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from taskvec.errors import TaskvecError
from taskvec.kernels.combine import (
    ALIGNMENT,
    KERNEL_DTYPES,
    _block_offsets,
    _check_inputs,
    _check_output,
    _round_to_bfloat16,
    pointer_table,
)

# Sparsifiers and consensus rules, as the kernel's compile-time switches.
SPARSIFY = {None: 0, "magnitude": 1, "random": 2}
CONSENSUS = {"mean": 0, "disjoint": 1}
BLOCK, WARPS = 1024, 4  # memory-bound; 1024 keeps the N running sums of a program in registers

_MIX1: tl.constexpr = tl.constexpr(0xBF58476D1CE4E5B9)  # splitmix64's multipliers (sparsify.py)
_MIX2: tl.constexpr = tl.constexpr(0x94D049BB133111EB)
GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1


@triton.jit
def _pointer(table_ptr, i, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table_ptr + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _task_entry(base, ft_ptr, offs, mask, local, slot, ints_ptr, floats_ptr, i, key_at, threshold_at, cutoff_at,
                SPARSIFY: tl.constexpr, WEIGHTED: tl.constexpr):
    """tau_i of one block, sparsified and weighted: the torch path's operations in its order."""
    tau = tl.load(ft_ptr + offs, mask=mask).to(tl.float32) - base
    if SPARSIFY == 2:  # DARE: u = splitmix64(key + j) >> 32 < limit, then tau * keep / density
        z = tl.load(ints_ptr + key_at + slot).to(tl.uint64, bitcast=True) + local.to(tl.uint64)
        z = (z ^ (z >> 30)) * _MIX1
        z = (z ^ (z >> 27)) * _MIX2
        z = z ^ (z >> 31)
        keep = (z >> 32) < tl.load(ints_ptr + key_at - 1).to(tl.uint64)
        tau = tl.div_rn(tau * keep.to(tl.float32), tl.load(floats_ptr))
    if SPARSIFY == 1:  # TIES: |tau| bits above T, or equal to T and not past the chunk's cutoff
        key = tau.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        threshold = tl.load(ints_ptr + threshold_at + slot)
        keep = (key > threshold) | ((key == threshold) & (local <= tl.load(ints_ptr + cutoff_at + slot)))
        tau = tau * keep.to(tl.float32)
    if WEIGHTED:
        tau = tau * tl.load(floats_ptr + 3 + i)
    return tau


@triton.jit
def _segment_block(base_ptr, table_ptr, outs_ptr, ints_ptr, floats_ptr, n_ft, n_out, offs, mask, seg,
                   key_at, threshold_at, cutoff_at, bounds_at, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
                   WEIGHTED: tl.constexpr, OUT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The outputs for the elements of `offs` in segment `seg` (those in `mask`)."""
    in_dtype = base_ptr.dtype.element_ty
    base = tl.load(base_ptr + offs, mask=mask).to(tl.float32)
    local = offs - tl.load(ints_ptr + bounds_at + seg)  # element index within the segment
    slot = seg * n_ft
    tau = _task_entry(base, _pointer(table_ptr, 0, in_dtype, ALIGNED), offs, mask, local, slot, ints_ptr,
                      floats_ptr, 0, key_at, threshold_at, cutoff_at, SPARSIFY, WEIGHTED)
    if CONSENSUS == 0:  # (weighted) mean
        total = tau
        for i in range(1, n_ft):
            total += _task_entry(base, _pointer(table_ptr, i, in_dtype, ALIGNED), offs, mask, local, slot + i,
                                 ints_ptr, floats_ptr, i, key_at, threshold_at, cutoff_at, SPARSIFY, WEIGHTED)
        if WEIGHTED:
            tau = tl.div_rn(total, tl.load(floats_ptr + 2))  # the weights' sum
        else:
            tau = tl.div_rn(total, tl.load(floats_ptr + 1))  # N
    else:  # sign election and disjoint mean, both signs' sums in one pass
        total = tau
        positive = (tau > 0).to(tl.float32)
        negative = (tau < 0).to(tl.float32)
        up = tau * positive
        down = tau * negative
        if WEIGHTED:
            weight = tl.load(floats_ptr + 3)
            n_up = positive * weight
            n_down = negative * weight
        else:
            n_up = positive
            n_down = negative
        for i in range(1, n_ft):
            tau = _task_entry(base, _pointer(table_ptr, i, in_dtype, ALIGNED), offs, mask, local, slot + i,
                              ints_ptr, floats_ptr, i, key_at, threshold_at, cutoff_at, SPARSIFY, WEIGHTED)
            total += tau
            positive = (tau > 0).to(tl.float32)
            negative = (tau < 0).to(tl.float32)
            up += tau * positive
            down += tau * negative
            if WEIGHTED:
                weight = tl.load(floats_ptr + 3 + i)
                n_up += positive * weight
                n_down += negative * weight
            else:
                n_up += positive
                n_down += negative
        elected = total >= 0
        divisor = tl.where(elected, n_up, n_down)
        tau = tl.div_rn(tl.where(elected, up, down), tl.where(divisor == 0, 1.0, divisor))
    for k in range(n_out):
        result = tau * tl.load(floats_ptr + 3 + n_ft + k) + base  # two roundings: fusion is off
        out_ptr = _pointer(outs_ptr, k, OUT_DTYPE, ALIGNED)
        if OUT_DTYPE == tl.bfloat16:
            result = _round_to_bfloat16(result)
        tl.store(out_ptr + offs, result.to(OUT_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["n_ft", "n_out", "numel", "key_at", "threshold_at", "cutoff_at", "bounds_at"])
def _sparse_combine_kernel(base_ptr, table_ptr, outs_ptr, ints_ptr, floats_ptr, n_ft, n_out, numel,
                           key_at, threshold_at, cutoff_at, bounds_at, SPARSIFY: tl.constexpr,
                           CONSENSUS: tl.constexpr, WEIGHTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """One job-aligned block: unmasked when full and inside one segment, else once per segment it
    touches (ints: [first segment, last segment] per block, then the tables at *_at)."""
    pid = tl.program_id(0)
    offs = _block_offsets(pid, BLOCK)
    first = tl.load(ints_ptr + 2 * pid)
    last = tl.load(ints_ptr + 2 * pid + 1)
    if (first == last) & ((pid.to(tl.int64) + 1) * BLOCK <= numel):
        _segment_block(base_ptr, table_ptr, outs_ptr, ints_ptr, floats_ptr, n_ft, n_out, offs, None, first,
                       key_at, threshold_at, cutoff_at, bounds_at, SPARSIFY, CONSENSUS, WEIGHTED, OUT_DTYPE,
                       ALIGNED)
    else:
        for seg in range(first, last + 1):
            lo = tl.load(ints_ptr + bounds_at + seg)
            hi = tl.load(ints_ptr + bounds_at + seg + 1)
            _segment_block(base_ptr, table_ptr, outs_ptr, ints_ptr, floats_ptr, n_ft, n_out, offs,
                           (offs >= lo) & (offs < hi), seg, key_at, threshold_at, cutoff_at, bounds_at,
                           SPARSIFY, CONSENSUS, WEIGHTED, OUT_DTYPE, ALIGNED)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def int_table(spans: Sequence, n_ft: int, block: int, *, sparsify: str | None = None, density: float = 1.0,
              seed: int = 0, cutoffs: Sequence[Sequence[tuple[int, int]]] | None = None) -> tuple[torch.Tensor, dict]:
    """The kernel's int64 table for a job of `spans` (objects with name, start, numel), on the host:
    per block its first and last segment; the segments' bounds in the job; DARE's per-(segment,
    input) stream keys (plus GOLDEN and the segment's start, so the kernel adds only the index)
    after the keep limit; TIES's (threshold, cutoff) pairs. Returns it and the tables' offsets."""
    from taskvec.methods.sparsify import stream_key

    bounds = [0]
    for span in spans:
        bounds.append(bounds[-1] + span.numel)
    numel = bounds[-1]
    starts = torch.arange(0, numel, block, dtype=torch.int64)
    ends = torch.tensor(bounds[1:], dtype=torch.int64)
    blocks = torch.stack([torch.searchsorted(ends, starts, right=True),
                          torch.searchsorted(ends, (starts + block).clamp(max=numel) - 1, right=True)], 1)
    parts = [blocks.flatten(), torch.tensor(bounds, dtype=torch.int64)]
    at = {"bounds_at": 2 * len(starts), "key_at": 0, "threshold_at": 0, "cutoff_at": 0}
    position = at["bounds_at"] + len(bounds)
    if sparsify == "random":
        keys = [_signed(stream_key(seed, span.name, i) + GOLDEN + span.start) for span in spans for i in range(n_ft)]
        parts.append(torch.tensor([int(density * 2**32), *keys], dtype=torch.int64))
        at["key_at"] = position + 1  # the limit sits just before the keys
    elif sparsify == "magnitude":
        if cutoffs is None or len(cutoffs) != len(spans) or any(len(c) != n_ft for c in cutoffs):
            raise TaskvecError("sparse_combine_triton: magnitude needs one (threshold, cutoff) per segment and input")
        parts.append(torch.tensor([t for per_span in cutoffs for t, _ in per_span], dtype=torch.int64))
        parts.append(torch.tensor([c for per_span in cutoffs for _, c in per_span], dtype=torch.int64))
        at["threshold_at"], at["cutoff_at"] = position, position + len(spans) * n_ft
    elif sparsify is not None:
        raise TaskvecError(f"sparse_combine_triton: unknown sparsifier {sparsify!r}")
    return torch.cat(parts), at


def float_table(n_ft: int, scales: Sequence[float], *, density: float = 1.0,
                weights: Sequence[float] | None = None) -> torch.Tensor:
    """[density, N, sum of weights, w_0.., -scale_0..] in float32, each rounded as torch rounds a
    Python number it computes with; the weights' sum is added row by row as consensus.py does."""
    from taskvec.methods.consensus import sum_rows

    w = torch.tensor(weights if weights is not None else [1.0] * n_ft, dtype=torch.float32)
    head = torch.tensor([density, n_ft], dtype=torch.float32)
    return torch.cat([head, sum_rows(w).view(1), w, torch.tensor([-s for s in scales], dtype=torch.float32)])


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def sparse_combine_triton(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    spans: Sequence,
    scales: Sequence[float],
    outs: Sequence[torch.Tensor],
    *,
    sparsify: str | None = None,
    consensus: str = "disjoint",
    density: float = 1.0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    cutoffs: Sequence[Sequence[tuple[int, int]]] | None = None,
    block: int = BLOCK,
) -> list[torch.Tensor]:
    """``outs[k] = base - scales[k] * tau`` for a job: `base` and `finetuned` the job's flat chunk,
    `spans` its segments in order (name, start: the first element's index in the tensor, numel).

    sparsify: None, "random" (DARE at `density`, `seed`) or "magnitude" (TIES: `cutoffs[s][i]` =
    (T, c) for segment s and input i: keep |tau| bits > T, and == T at segment positions <= c);
    consensus: "mean" or "disjoint"; weights: N floats or None. Inputs as for `combine_triton`;
    outputs: one dtype of KERNEL_DTYPES, contiguous, base's numel, overlapping nothing. Equal bit
    for bit to the general executor's torch path.
    """
    finetuned, outs = list(finetuned), list(outs)
    _check_inputs(base, finetuned)
    if consensus not in CONSENSUS:
        raise TaskvecError(f"sparse_combine_triton: unknown consensus {consensus!r}")
    if not outs or len(outs) != len(scales):
        raise TaskvecError(f"sparse_combine_triton: {len(scales)} scales but {len(outs)} outputs")
    if weights is not None and len(weights) != len(finetuned):
        raise TaskvecError(f"sparse_combine_triton: {len(weights)} weights for {len(finetuned)} inputs")
    for k, out in enumerate(outs):
        _check_output(base, [*finetuned, *outs[:k]], outs[0].dtype, out)
    numel = base.numel()
    if sum(span.numel for span in spans) != numel:
        raise TaskvecError(f"sparse_combine_triton: the segments hold {sum(s.numel for s in spans)} elements, "
                           f"the chunk {numel}")
    if not numel:
        return [out.view(base.shape) for out in outs]
    if sparsify not in SPARSIFY:
        raise TaskvecError(f"sparse_combine_triton: unknown sparsifier {sparsify!r}")
    ints, at = int_table(spans, len(finetuned), block, sparsify=sparsify, density=density, seed=seed,
                         cutoffs=cutoffs)
    floats = float_table(len(finetuned), scales, density=density, weights=weights)
    table, out_table = pointer_table(finetuned), pointer_table(outs)
    ints, floats = _on(ints, base.device), _on(floats, base.device)
    aligned = all(p % ALIGNMENT == 0 for p in (*table.addresses, *out_table.addresses, base.data_ptr()))
    with torch.cuda.device(base.device) if base.is_cuda else nullcontext():
        _sparse_combine_kernel[(triton.cdiv(numel, block),)](
            base, table.table, out_table.table, ints, floats, len(finetuned), len(outs), numel,
            at["key_at"], at["threshold_at"], at["cutoff_at"], at["bounds_at"], SPARSIFY=SPARSIFY[sparsify],
            CONSENSUS=CONSENSUS[consensus], WEIGHTED=weights is not None, OUT_DTYPE=_TL_DTYPES[outs[0].dtype],
            BLOCK=block, ALIGNED=aligned, num_warps=WARPS, enable_fp_fusion=False)
    return [out.view(base.shape) for out in outs]


__all__ = ["BLOCK", "CONSENSUS", "KERNEL_DTYPES", "SPARSIFY", "float_table", "int_table", "sparse_combine_triton"]
