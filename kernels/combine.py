"""The fused merge kernel: ``out = base_coef * base + sum_coef * sum_i ft_i`` in one pass.

Each program reads one block of the base and of every fine-tune once, accumulates in float32
and writes the block once: (N + 2) tensor-sized memory transfers, the minimum. Design choices
(docs/kernels.md explains them at length):

* The fine-tunes reach the kernel as a device table of int64 addresses, loaded and cast to
  pointers in a runtime loop, so one compiled kernel serves every N and every shape.
* Offsets are int64, so tensors past 2**31 elements index correctly.
* Full blocks run unmasked (vectorised 16-byte accesses whatever numel is); only the last,
  partial block is masked.
* The linear form is one explicit fused multiply-add, fma(base, base_coef, sum_coef * acc),
  the rounding torch's CPU `add_(alpha=)` does: left to itself the GPU compiler contracts it
  the other way round, so results would differ from the CPU path in the last bit.
* bfloat16 outputs are rounded to nearest-even with integer arithmetic, identical on GPUs and
  in Triton's CPU interpreter (whose own float32 -> bfloat16 cast truncates).

Together these make the kernel's output equal, bit for bit, to `combine_reference`'s.

This module imports triton; callers check `taskvec.kernels.triton_available()` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from taskvec.errors import TaskvecError

# Storage dtypes the kernel reads and writes; float64 stays on the torch path (combine_reference).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Heuristic launch configurations (memory-bound; see docs/kernels.md). Big tensors: 4096
# elements per program, 8 warps = 16 elements (one or more 16-byte vectors) per thread per
# input. Below SMALL_NUMEL (about 4 programs per SM of an H100 at 4096), smaller blocks keep
# every SM busy. Two block sizes only: the compile count stays bounded.
LARGE = (4096, 8)
SMALL = (1024, 4)
SMALL_NUMEL = 4096 * 132 * 4
ALIGNMENT = 16  # bytes: the widest vector access


@triton.jit
def _block_offsets(pid, BLOCK: tl.constexpr):
    """Element offsets of block `pid`, in int64 so that they stay exact past 2**31."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest-even (as torch does), NaN kept a quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _combine_block(base_ptr, table_ptr, out_ptr, n_ft, offs, mask, base_coef, sum_coef,
                   ALIGNED: tl.constexpr):
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for i in range(n_ft):
        ft_ptr = tl.load(table_ptr + i).to(tl.pointer_type(base_ptr.dtype.element_ty))
        if ALIGNED:
            ft_ptr = tl.multiple_of(ft_ptr, 16)
        acc += tl.load(ft_ptr + offs, mask=mask).to(tl.float32)
    base = tl.load(base_ptr + offs, mask=mask).to(tl.float32)
    result = tl.fma(base, base_coef, sum_coef * acc)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        result = _round_to_bfloat16(result)
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_ft", "numel"])
def _combine_kernel(base_ptr, table_ptr, out_ptr, n_ft, numel, base_coef, sum_coef,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    offs = _block_offsets(tl.program_id(0), BLOCK)
    if (tl.program_id(0).to(tl.int64) + 1) * BLOCK <= numel:
        _combine_block(base_ptr, table_ptr, out_ptr, n_ft, offs, None, base_coef, sum_coef, ALIGNED)
    else:
        _combine_block(base_ptr, table_ptr, out_ptr, n_ft, offs, offs < numel, base_coef, sum_coef,
                       ALIGNED)


@triton.jit
def _scales_block(base_ptr, table_ptr, outs_ptr, coefs_ptr, n_ft, n_out, offs, mask,
                  OUT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for i in range(n_ft):
        ft_ptr = tl.load(table_ptr + i).to(tl.pointer_type(base_ptr.dtype.element_ty))
        if ALIGNED:
            ft_ptr = tl.multiple_of(ft_ptr, 16)
        acc += tl.load(ft_ptr + offs, mask=mask).to(tl.float32)
    base = tl.load(base_ptr + offs, mask=mask).to(tl.float32)
    for k in range(n_out):
        result = tl.fma(base, tl.load(coefs_ptr + 2 * k), tl.load(coefs_ptr + 2 * k + 1) * acc)
        out_ptr = tl.load(outs_ptr + k).to(tl.pointer_type(OUT_DTYPE))
        if ALIGNED:
            out_ptr = tl.multiple_of(out_ptr, 16)
        if OUT_DTYPE == tl.bfloat16:
            result = _round_to_bfloat16(result)
        tl.store(out_ptr + offs, result.to(OUT_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["n_ft", "n_out", "numel"])
def _combine_scales_kernel(base_ptr, table_ptr, outs_ptr, coefs_ptr, n_ft, n_out, numel,
                           OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """K linear forms of one sum: each input block read once, K outputs written. Full blocks
    unmasked, the last one masked, as `_combine_kernel`."""
    offs = _block_offsets(tl.program_id(0), BLOCK)
    if (tl.program_id(0).to(tl.int64) + 1) * BLOCK <= numel:
        _scales_block(base_ptr, table_ptr, outs_ptr, coefs_ptr, n_ft, n_out, offs, None, OUT_DTYPE, ALIGNED)
    else:
        _scales_block(base_ptr, table_ptr, outs_ptr, coefs_ptr, n_ft, n_out, offs, offs < numel, OUT_DTYPE,
                      ALIGNED)


@dataclass(frozen=True)
class PointerTable:
    """The fine-tunes' addresses, on their device: build once, reuse for launches on the same buffers."""

    addresses: tuple[int, ...]
    table: torch.Tensor


def pointer_table(tensors: Sequence[torch.Tensor]) -> PointerTable:
    """An int64 table of `tensors`' data pointers on their device.

    On a GPU it is uploaded from pinned memory without blocking, in order on the current stream
    (a plain `torch.tensor(..., device=)` would wait for all the stream's queued work).
    """
    addresses = tuple(t.data_ptr() for t in tensors)
    table = torch.tensor(addresses, dtype=torch.int64)
    if tensors[0].is_cuda:
        table = table.pin_memory().to(tensors[0].device, non_blocking=True)
    return PointerTable(addresses, table)


def launch_config(numel: int) -> tuple[int, int]:
    """(block size, warps) for a tensor of `numel` elements."""
    return SMALL if numel < SMALL_NUMEL else LARGE


def interpreted() -> bool:
    """True when the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_combine_kernel, InterpretedFunction)


def combine_triton(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    base_coef: float,
    sum_coef: float,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    table: PointerTable | None = None,
) -> torch.Tensor:
    """Return ``base_coef * base + sum_coef * sum(finetuned)`` in ``dtype`` (default: base's).

    Mirrors `combine_reference`: float32 accumulation, optional ``out`` (contiguous, base's
    numel, not overlapping an input). All inputs: one dtype of KERNEL_DTYPES, contiguous, base's
    shape, on one CUDA device (CPU under TRITON_INTERPRET=1). ``table`` may be a PointerTable of
    ``finetuned`` built earlier, to skip a host-to-device copy per call. Inputs must stay alive
    until the kernel has run (stream order), as the table holds raw addresses.
    """
    finetuned = list(finetuned)
    _check_inputs(base, finetuned)
    out = _check_output(base, finetuned, dtype, out)
    if table is None:
        table = pointer_table(finetuned)
    elif table.addresses != tuple(t.data_ptr() for t in finetuned):
        raise TaskvecError("combine_triton: the pointer table was built for other tensors")
    numel = base.numel()
    if numel:
        block, warps = launch_config(numel)
        aligned = all(p % ALIGNMENT == 0 for p in table.addresses)
        grid = (triton.cdiv(numel, block),)
        with torch.cuda.device(base.device) if base.is_cuda else nullcontext():
            _combine_kernel[grid](base, table.table, out, len(finetuned), numel,
                                  float(base_coef), float(sum_coef),
                                  BLOCK=block, ALIGNED=aligned, num_warps=warps)
    return out.view(base.shape)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def coefficient_table(forms: Sequence[tuple[float, float]], device: torch.device) -> torch.Tensor:
    """(base_coef, sum_coef) of each form as float32, the kernel's arguments, on `device`."""
    table = torch.tensor([c for form in forms for c in form], dtype=torch.float32)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def combine_triton_scales(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    forms: Sequence[tuple[float, float]],
    outs: Sequence[torch.Tensor],
    *,
    table: PointerTable | None = None,
    out_table: PointerTable | None = None,
    coefficients: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``outs[k] = forms[k][0] * base + forms[k][1] * sum(finetuned)`` for every k, in one pass:
    each input read once, the sum kept in registers, K outputs written (a list of scales).

    Each output equals `combine_triton(base, finetuned, *forms[k])` bit for bit. ``outs``: one
    dtype of KERNEL_DTYPES, contiguous, base's numel, overlapping no input and no other output.
    Tables (pointer tables of ``finetuned`` and ``outs``, `coefficient_table(forms)`) may be
    built once and reused, as for `combine_triton`.
    """
    finetuned, outs = list(finetuned), list(outs)
    _check_inputs(base, finetuned)
    if not outs or len(outs) != len(forms):
        raise TaskvecError(f"combine_triton_scales: {len(forms)} forms but {len(outs)} outputs")
    for k, out in enumerate(outs):
        _check_output(base, [*finetuned, *outs[:k]], outs[0].dtype, out)
    table = table or pointer_table(finetuned)
    out_table = out_table or pointer_table(outs)
    if table.addresses != tuple(t.data_ptr() for t in finetuned) or \
            out_table.addresses != tuple(t.data_ptr() for t in outs):
        raise TaskvecError("combine_triton_scales: a pointer table was built for other tensors")
    coefficients = coefficient_table(forms, base.device) if coefficients is None else coefficients
    numel = base.numel()
    if numel:
        block, warps = launch_config(numel)
        aligned = all(p % ALIGNMENT == 0 for p in (*table.addresses, *out_table.addresses, base.data_ptr()))
        grid = (triton.cdiv(numel, block),)
        with torch.cuda.device(base.device) if base.is_cuda else nullcontext():
            _combine_scales_kernel[grid](base, table.table, out_table.table, coefficients, len(finetuned),
                                         len(outs), numel, OUT_DTYPE=_TL_DTYPES[outs[0].dtype],
                                         BLOCK=block, ALIGNED=aligned, num_warps=warps)
    return [out.view(base.shape) for out in outs]


def _check_inputs(base: torch.Tensor, finetuned: list[torch.Tensor]) -> None:
    if not finetuned:
        raise TaskvecError("combine_triton needs at least one fine-tuned tensor, got none")
    if base.device.type != "cuda" and not (base.device.type == "cpu" and interpreted()):
        raise TaskvecError(f"combine_triton needs CUDA tensors, base is on {base.device} "
                           "(use combine_reference, or TRITON_INTERPRET=1 for CPU)")
    if base.device.type == "cuda" and interpreted():  # the interpreter would read device addresses as host ones
        raise TaskvecError("combine_triton: TRITON_INTERPRET=1 runs kernels on the CPU and cannot take "
                           "CUDA tensors (unset it to use the GPU)")
    if base.dtype not in KERNEL_DTYPES:
        raise TaskvecError(f"combine_triton: base has dtype {base.dtype}; supported: "
                        f"{', '.join(str(d) for d in KERNEL_DTYPES)}")
    for name, tensor in [("base", base), *((f"finetuned[{i}]", t) for i, t in enumerate(finetuned))]:
        if tensor.device != base.device:
            raise TaskvecError(f"combine_triton: {name} is on {tensor.device}, base is on {base.device}")
        if tensor.dtype != base.dtype:
            raise TaskvecError(f"combine_triton: {name} has dtype {tensor.dtype}, base has {base.dtype}")
        if tensor.shape != base.shape:
            raise TaskvecError(f"combine_triton: {name} has shape {list(tensor.shape)}, "
                             f"base has {list(base.shape)}")
        if not tensor.is_contiguous():
            raise TaskvecError(f"combine_triton: {name} is not contiguous (call .contiguous())")


def _check_output(base, finetuned, dtype, out) -> torch.Tensor:
    if out is None:
        dtype = base.dtype if dtype is None else dtype
        if dtype not in KERNEL_DTYPES:
            raise TaskvecError(f"combine_triton: output dtype {dtype} is not supported")
        return torch.empty(base.shape, dtype=dtype, device=base.device)
    if dtype is not None and out.dtype != dtype:
        raise TaskvecError(f"combine_triton: out has dtype {out.dtype}, but dtype={dtype} was asked")
    if out.dtype not in KERNEL_DTYPES:
        raise TaskvecError(f"combine_triton: out has dtype {out.dtype}, which is not supported")
    if out.device != base.device:
        raise TaskvecError(f"combine_triton: out is on {out.device}, base is on {base.device}")
    if out.numel() != base.numel() or not out.is_contiguous():
        raise TaskvecError(f"combine_triton: out must be contiguous with {base.numel()} elements, "
                         f"got {out.numel()}{'' if out.is_contiguous() else ' (not contiguous)'}")
    start, end = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    for i, tensor in enumerate([base, *finetuned]):
        t_start = tensor.data_ptr()
        if t_start < end and start < t_start + tensor.numel() * tensor.element_size():
            raise TaskvecError(f"combine_triton: out overlaps {'base' if i == 0 else f'finetuned[{i - 1}]'}")
    return out
