"""The fused non-linear combine (TIES, DARE, dare-ties) on a CPU: one compiled numba loop per job.

The CPU twin of sparse_combine.py's Triton kernel. Tile by tile (TILE elements of one segment,
which stay in a core's L1), it reads the base and every fine-tune once and computes

    tau_i = ft_i - base                          (float32; float64 for float64 inputs)
    DARE:      tau_i = (tau_i * keep_i) / density  keep_i: splitmix64 of (seed, input, tensor, index)
    TIES:      tau_i = tau_i * keep_i              keep_i: |tau_i| key above the tensor's exact threshold
    weights:   tau_i = tau_i * w_i
    mean:      tau = (tau_0 + tau_1 + ...) / N     (or / (w_0 + w_1 + ...))
    disjoint:  tau = sum of the tau_i whose sign is that of sum_i tau_i, / their count (or weights)
    out_k = (tau * -scale_k) + base              (in the accumulation dtype)

op for op what the torch path does (taskvec.methods: sparsify.py, consensus.py, and the general
executor's output step), so the bytes are the same: every operation is an IEEE operation of the
accumulation dtype rounded to nearest, sums run row by row from row 0, divisions are exact, and
nothing is contracted into a fused multiply-add (numba never passes fastmath or contraction flags
to LLVM here; tests/test_sparse_combine_cpu.py checks the machine code has no FMA). The disjoint
mean is one pass, as in the kernel: the sums over the positive and over the negative entries are
both kept, and the elected sign picks one, which adds the very terms (zeros included) the torch
path adds. DARE's mask is the splitmix64 stream of sparsify.py in wrapping uint64 arithmetic;
TIES's keep rule is `MagnitudeThresholds.keep_rule`'s (T, cutoff) per segment and input.

Inputs: float32, float64, bfloat16 (widened by its bits, as torch does) and float16 (widened by
its bits; torch converts NaN halves differently in a vector's body and its scalar tail, so a job
whose float16 inputs hold a NaN is run again on inputs that torch converted, the torch path's way).
Outputs: K buffers of the accumulation dtype; the caller casts to another output dtype with
torch's `.copy_()`, as the torch path does. A job is split into `threads` element ranges, run on
Python threads (the loop releases the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from taskvec.errors import TaskvecError

SPARSIFY = {None: 0, "magnitude": 1, "random": 2}
CONSENSUS = {"mean": 0, "disjoint": 1}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TILE = 1024  # elements per step: the base, tau and five running sums of a tile fit in L1
PARALLEL_MIN = 1 << 16  # elements per thread below which a thread costs more than it saves

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's multipliers (sparsify.py)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)

# The float table: [density, N, sum of weights, 1, 0, w_0.., -scale_0..], in the accumulation dtype.
_DENSITY, _COUNT, _WEIGHT_SUM, _ONE, _ZERO, _WEIGHTS = range(6)

# How the loop reads each input dtype (numba has no 16-bit floats: their bits, as integers).
_VIEWS = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.uint16,
          torch.float16: torch.int16}


@intrinsic
def _pointer(typingctx, address, like):
    """`address` (an int64) as a pointer to `like`'s dtype."""
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits`."""
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif value.type.width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    """The bit pattern of the float32 `value`, as an int32."""
    sig = types.int32(value)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _widen(x):
    """An input element in the accumulation dtype (exact)."""


@overload(_widen)
def _widen_overload(x):
    if x in (types.float32, types.float64):
        return lambda x: x
    if x == types.uint16:  # bfloat16: the upper half of a float32
        return lambda x: _float32_from_bits(np.uint32(x) << np.uint32(16))
    if x == types.int16:  # float16
        def half(x):
            h = np.uint32(x) & np.uint32(0xFFFF)
            sign = (h & np.uint32(0x8000)) << np.uint32(16)
            exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
            mantissa = h & np.uint32(0x3FF)
            if exponent == 0x1F:  # inf, NaN (payload kept; NaN jobs are rerun, see the module doc)
                return _float32_from_bits(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
            if exponent != 0:
                return _float32_from_bits(sign | ((exponent + np.uint32(112)) << np.uint32(23))
                                          | (mantissa << np.uint32(13)))
            subnormal = np.float32(mantissa) * np.float32(2.0**-24)  # exact, and normal in float32
            return -subnormal if sign else subnormal

        return half
    return None


def _half_nan(x):
    """Whether an input element is a float16 NaN (never for other dtypes)."""


@overload(_half_nan)
def _half_nan_overload(x):
    if x == types.int16:
        return lambda x: ((x & 0x7C00) == 0x7C00) & ((x & 0x3FF) != 0)
    return lambda x: False


def _magnitude_key(v):
    """|v| rounded to float32, its bits as an int32 (sparsify.magnitude_key)."""


@overload(_magnitude_key)
def _magnitude_key_overload(v):
    if v == types.float32:
        return lambda v: _bits_of_float32(abs(v))
    return lambda v: _bits_of_float32(np.float32(abs(v)))


@numba.njit(nogil=True, cache=True, inline="always")
def _add(a, b):
    """a + b, with b's NaN (quieted) wherever b is NaN: torch's add_ on a CPU is fmadd(b, 1, a),
    which gives b's NaN first where both are NaN, and LLVM may put either operand of an add first.
    (tau_i = ft_i - base needs no such care: where both are NaN, torch's sub_ keeps the base's NaN
    and this loop ft_i's, but that position's every output is the base's NaN, the last add's b.)"""
    return b + b if b != b else a + b


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _combine(base, ft_at, out_at, lo, hi, bounds, keys, rules, floats, limit, sparsify, consensus, weighted):
    """outs[k][lo:hi] for a job: base (the job's chunk), the fine-tunes and the K outputs at the
    addresses ft_at, out_at (outputs of floats' dtype); bounds: the segments' first elements and
    the end; per (segment, input) s * N + i: DARE's stream key (plus GOLDEN and the segment's
    start) and TIES's (T, cutoff). Returns whether a float16 NaN was read."""
    numel = base.shape[0]
    n = ft_at.shape[0]
    one, zero = floats[_ONE], floats[_ZERO]
    density = floats[_DENSITY]
    divisor = floats[_WEIGHT_SUM] if weighted else floats[_COUNT]
    scales_at = _WEIGHTS + n
    b = np.empty(TILE, floats.dtype)
    t = np.empty(TILE, floats.dtype)
    total = np.empty(TILE, floats.dtype)
    up = np.empty(TILE, floats.dtype)
    down = np.empty(TILE, floats.dtype)
    n_up = np.empty(TILE, floats.dtype)
    n_down = np.empty(TILE, floats.dtype)
    half_nan = False
    for s in range(bounds.shape[0] - 1):
        seg_lo = max(bounds[s], lo)
        seg_hi = min(bounds[s + 1], hi)
        for t0 in range(seg_lo, seg_hi, TILE):
            m = min(TILE, seg_hi - t0)
            local = t0 - bounds[s]  # the tile's first element's index in the segment
            x = base[t0:t0 + m]
            for j in range(m):
                b[j] = _widen(x[j])
                half_nan |= _half_nan(x[j])
            for i in range(n):
                ft = numba.carray(_pointer(ft_at[i], base), numel)[t0:t0 + m]
                for j in range(m):
                    half_nan |= _half_nan(ft[j])
                if sparsify == 2:  # DARE: u = splitmix64(key + j) >> 32 < limit, then tau * keep / density
                    z0 = keys[s * n + i] + np.uint64(local)
                    for j in range(m):
                        v = _widen(ft[j]) - b[j]
                        z = z0 + np.uint64(j)
                        z = (z ^ (z >> _S30)) * _MIX1
                        z = (z ^ (z >> _S27)) * _MIX2
                        z = z ^ (z >> _S31)
                        t[j] = (v * (one if np.int64(z >> _S32) < limit else zero)) / density  # both below 2**32
                elif sparsify == 1:  # TIES: key above T, or equal to T and not past the cutoff
                    threshold = rules[s * n + i, 0]
                    cutoff = rules[s * n + i, 1] - local
                    for j in range(m):
                        v = _widen(ft[j]) - b[j]
                        key = _magnitude_key(v)
                        keep = (key > threshold) | ((key == threshold) & (j <= cutoff))
                        t[j] = v * (one if keep else zero)
                else:
                    for j in range(m):
                        t[j] = _widen(ft[j]) - b[j]
                if weighted:
                    w = floats[_WEIGHTS + i]
                    for j in range(m):
                        t[j] = t[j] * w
                if consensus == 0:
                    if i == 0:
                        for j in range(m):
                            total[j] = t[j]
                    else:
                        for j in range(m):
                            total[j] = _add(total[j], t[j])
                elif i == 0:
                    w = floats[_WEIGHTS] if weighted else one
                    for j in range(m):
                        v = t[j]
                        positive = one if v > zero else zero
                        negative = one if v < zero else zero
                        total[j] = v
                        up[j] = v * positive
                        down[j] = v * negative
                        n_up[j] = positive * w if weighted else positive
                        n_down[j] = negative * w if weighted else negative
                else:
                    w = floats[_WEIGHTS + i] if weighted else one
                    for j in range(m):
                        v = t[j]
                        positive = one if v > zero else zero
                        negative = one if v < zero else zero
                        total[j] = _add(total[j], v)
                        up[j] = _add(up[j], v * positive)
                        down[j] = _add(down[j], v * negative)
                        n_up[j] = n_up[j] + (positive * w if weighted else positive)
                        n_down[j] = n_down[j] + (negative * w if weighted else negative)
            if consensus == 0:
                for j in range(m):
                    t[j] = total[j] / divisor
            else:
                for j in range(m):  # every operand loaded, then selected: the loop vectorises
                    elected = total[j] >= zero
                    above, below, count_above, count_below = up[j], down[j], n_up[j], n_down[j]
                    agreeing = count_above if elected else count_below
                    t[j] = (above if elected else below) / (one if agreeing == zero else agreeing)
            for k in range(out_at.shape[0]):
                out = numba.carray(_pointer(out_at[k], floats), numel)[t0:t0 + m]
                scale = floats[scales_at + k]
                for j in range(m):
                    out[j] = _add(t[j] * scale, b[j])  # two roundings: numba does not contract
    return half_nan


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_table(n_ft: int, scales: Sequence[float], dtype: torch.dtype, *, density: float = 1.0,
                weights: Sequence[float] | None = None) -> torch.Tensor:
    """[density, N, sum of weights, 1, 0, w_0.., -scale_0..] in `dtype`, each rounded as torch
    rounds a Python number it computes with; the weights' sum is added row by row as consensus.py does."""
    from taskvec.methods.consensus import sum_rows

    w = torch.tensor(weights if weights is not None else [1.0] * n_ft, dtype=dtype)
    head = torch.tensor([density, n_ft], dtype=dtype)
    return torch.cat([head, sum_rows(w).view(1), torch.tensor([1.0, 0.0], dtype=dtype), w,
                      torch.tensor([-s for s in scales], dtype=dtype)])


def _tables(spans, n_ft, sparsify, density, seed, cutoffs):
    from taskvec.methods.sparsify import stream_key

    bounds = [0]
    for span in spans:
        bounds.append(bounds[-1] + span.numel)
    keys = np.zeros(1, dtype=np.uint64)
    rules = np.zeros((1, 2), dtype=np.int64)
    if sparsify == "random":
        keys = np.array([(stream_key(seed, span.name, i) + _GOLDEN + span.start) & _MASK64
                         for span in spans for i in range(n_ft)], dtype=np.uint64)
    elif sparsify == "magnitude":
        if cutoffs is None or len(cutoffs) != len(spans) or any(len(c) != n_ft for c in cutoffs):
            raise TaskvecError("sparse_combine_cpu: magnitude needs one (threshold, cutoff) per segment and input")
        rules = np.array([rule for per_span in cutoffs for rule in per_span], dtype=np.int64).reshape(-1, 2)
    return np.array(bounds, dtype=np.int64), keys, rules


def _segment_floats(values: torch.Tensor, spans) -> torch.Tensor:
    """A fine-tune widened as the torch path widens it, segment by segment (NaN halves convert
    differently in a vector's body and its tail; the base is one conversion of the chunk)."""
    out = torch.empty(values.numel(), dtype=torch.float32)
    position = 0
    for span in spans:
        out[position:position + span.numel].copy_(values[position:position + span.numel])
        position += span.numel
    return out


def sparse_combine_cpu(
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
    threads: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> list[torch.Tensor]:
    """``outs[k] = base - scales[k] * tau`` for a job on the CPU: `base` and `finetuned` the job's
    flat chunk (one dtype of DTYPES), `spans` its segments in order (name, start: the first
    element's index in the tensor, numel), `outs` K contiguous CPU tensors of the accumulation
    dtype (float32; float64 for float64 inputs). The other arguments as for
    `sparse_combine_triton`. `threads` element ranges run on `pool` (one per thread; None: in
    this thread). Equal bit for bit to the general executor's torch path."""
    finetuned, outs = list(finetuned), list(outs)
    if not finetuned:
        raise TaskvecError("sparse_combine_cpu needs at least one fine-tuned tensor, got none")
    if base.dtype not in DTYPES:
        raise TaskvecError(f"sparse_combine_cpu: base has dtype {base.dtype}; supported: "
                           f"{', '.join(str(d) for d in DTYPES)}")
    numel = base.numel()
    for name, tensor in [("base", base), *((f"finetuned[{i}]", t) for i, t in enumerate(finetuned))]:
        if tensor.device.type != "cpu" or tensor.dtype != base.dtype or tensor.numel() != numel \
                or not tensor.is_contiguous():
            raise TaskvecError(f"sparse_combine_cpu: {name} must be a contiguous CPU tensor of base's dtype "
                               f"and size")
    dtype = acc_dtype(base.dtype)
    if not outs or len(outs) != len(scales):
        raise TaskvecError(f"sparse_combine_cpu: {len(scales)} scales but {len(outs)} outputs")
    for k, out in enumerate(outs):
        if out.device.type != "cpu" or out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
            raise TaskvecError(f"sparse_combine_cpu: outs[{k}] must be a contiguous CPU {dtype} tensor of "
                               f"base's size")
    if consensus not in CONSENSUS:
        raise TaskvecError(f"sparse_combine_cpu: unknown consensus {consensus!r}")
    if sparsify not in SPARSIFY:
        raise TaskvecError(f"sparse_combine_cpu: unknown sparsifier {sparsify!r}")
    if weights is not None and len(weights) != len(finetuned):
        raise TaskvecError(f"sparse_combine_cpu: {len(weights)} weights for {len(finetuned)} inputs")
    if sum(span.numel for span in spans) != numel:
        raise TaskvecError(f"sparse_combine_cpu: the segments hold {sum(s.numel for s in spans)} elements, "
                           f"the chunk {numel}")
    if not numel:
        return outs
    bounds, keys, rules = _tables(spans, len(finetuned), sparsify, density, seed, cutoffs)
    floats = float_table(len(finetuned), scales, dtype, density=density, weights=weights).numpy()
    out_at = np.array([out.data_ptr() for out in outs], dtype=np.int64)
    constants = (bounds, keys, rules, floats, int(density * 2**32), SPARSIFY[sparsify],
                 CONSENSUS[consensus], weights is not None)

    def run_on(base_values, ft_values):
        ft_at = np.array([f.data_ptr() for f in ft_values], dtype=np.int64)
        array = base_values.view(_VIEWS[base_values.dtype]).numpy()
        blocks = max(1, min(threads, numel // PARALLEL_MIN)) if pool is not None else 1
        if blocks == 1:
            return _combine(array, ft_at, out_at, 0, numel, *constants)
        edges = [numel * b // blocks for b in range(blocks + 1)]
        futures = [pool.submit(_combine, array, ft_at, out_at, lo, hi, *constants)
                   for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
        return any([future.result() for future in futures])

    if run_on(base, finetuned):  # a float16 NaN: widen the inputs as the torch path does, and again
        run_on(base.to(torch.float32), [_segment_floats(f, spans) for f in finetuned])
    return outs


__all__ = ["CONSENSUS", "DTYPES", "SPARSIFY", "TILE", "acc_dtype", "float_table", "sparse_combine_cpu"]
