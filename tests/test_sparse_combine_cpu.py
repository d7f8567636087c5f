"""The compiled CPU combine (kernels/sparse_combine_cpu.py) against the general executor's torch
path, bit for bit.

Both paths run through the real executor (`TorchExecutor.run`: statistics passes, prefetching,
the wiring of either path) on an in-memory plan, so chunk boundaries that cut tensors, packed small
tensors, TIES's pre-pass and its count of ties at the threshold are those of a merge; and through
`merge_checkpoints` with the module switch on and off. Quantized inputs (multiples of 1/4 and
1/512) give many exact ties in |tau|; normal deviates put every rounding in the last bits; special
values (NaN of either sign, signalling NaN, inf, -0) test that NaN payloads come out as torch's.
"""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numba
import pytest
import torch
from memory_merge import MemoryReader, MemoryWriter, NoProgress, make_jobs, make_models

from taskvec.errors import TaskvecError
from taskvec.kernels import sparse_combine_cpu as cpu
from taskvec.kernels.sparse_combine_cpu import sparse_combine_cpu
from taskvec.merge import merge_checkpoints
from taskvec.methods import get_method
from taskvec.methods.sparsify import MagnitudeThresholds, random_keep, splitmix64, stream_key
from taskvec.stream import general
from taskvec.stream.general import TorchExecutor

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def calls(monkeypatch):
    """Every call of the compiled loop: its element range (lo, hi), so a test proves it ran."""
    records = []
    loop = cpu._combine

    def spy(base, ft_at, out_at, lo, hi, *rest):
        records.append((lo, hi))
        return loop(base, ft_at, out_at, lo, hi, *rest)

    monkeypatch.setattr(cpu, "_combine", spy)
    return records


SPECIAL_BITS = {  # NaN, -NaN, a signalling NaN with a payload, inf, -inf, -0
    torch.float32: (torch.int32, [0x7FC00000, -0x400000, 0x7F800123, 0x7F800000, -0x800000, -0x80000000]),
    torch.float64: (torch.int64, [0x7FF8000000000000, -0x8000000000000, 0x7FF0000000000123, 0x7FF0000000000000,
                                  -0x10000000000000, -0x8000000000000000]),
    torch.bfloat16: (torch.int16, [0x7FC0, -0x40, 0x7F83, 0x7F80, -0x80, -0x8000]),
    torch.float16: (torch.int16, [0x7E00, -0x200, 0x7C05, 0x7C00, -0x400, -0x8000]),
}


def with_specials(models, seed):
    """Every input with one entry in 20 replaced by a special value (base and fine-tunes alike, so
    NaNs meet NaNs of other signs and payloads, and inf meets inf)."""
    g = torch.Generator().manual_seed(seed)
    for model in models:
        for tensor in model.values():
            view_dtype, bits = SPECIAL_BITS[tensor.dtype]
            specials = torch.tensor(bits, dtype=torch.int64).to(view_dtype).view(tensor.dtype)
            where = torch.randint(0, tensor.numel(), (max(1, tensor.numel() // 20),), generator=g)
            tensor[where] = specials[torch.randint(0, len(bits), where.shape, generator=g)]
    return models



def run(compiled, models, method, scales, chunk, out_dtype=None, weights=None):
    """One merge through `TorchExecutor.run` on the CPU: a dict of flat outputs per scale."""
    out_dtype = out_dtype or next(iter(models[0].values())).dtype
    jobs = make_jobs(models, chunk, out_dtype)
    plan = SimpleNamespace(jobs=jobs, n_inputs=len(models), buffer_bytes=max(j.numel for j in jobs) * 8)
    forms = method.forms(len(models) - 1, scales, weights)
    writers = [MemoryWriter(models, out_dtype) for _ in scales]
    TorchExecutor("cpu", kernel=False, compiled=compiled).run(plan, forms, MemoryReader(models), writers,
                                                              NoProgress())
    return [w.out for w in writers]


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same(got, expected, what=""):
    for scale, (out, want) in enumerate(zip(got, expected, strict=True)):
        for name in want:
            differ = (out[name].view(torch.uint8) != want[name].view(torch.uint8)).view(
                -1, want[name].element_size()).any(1)
            assert not differ.any(), (what, scale, name, f"{int(differ.sum())} entries differ, first at "
                                      f"{int(differ.nonzero()[0])}: {out[name][differ][:3]} vs "
                                      f"{want[name][differ][:3]}")


DYADIC = [0.5, 2.0, 1.0, 3.0, 0.25]
GENERIC = [1.0, 3.14159, 0.3, 2.7182818, 1.41421356]
CASES = [  # method, parameters, weights (N = 1: none)
    ("ties", dict(density=0.3), None),
    ("ties", dict(density=1.0), DYADIC),
    ("dare", dict(density=0.5, seed=7), None),
    ("dare", dict(density=0.6, seed=2**32 - 1), GENERIC),
    ("dare-ties", dict(density=0.5, seed=3), DYADIC),
    ("ties", dict(density=0.05), GENERIC),
]
IDS = [f"{c[0]}-{c[1]['density']}-w{bool(c[2])}" for c in CASES]
SCALES = [0.75, -1.5, 0.0, 1e-3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_compiled_equals_the_torch_path(calls, dtype, n):
    """Every case, quantized and generic values (N = 5: normal deviates), chunk 1200: a.weight
    (1517 elements) cut in two, the second job packing its rest with the small tensors."""
    models = make_models(n, dtype, seed=n, generic=n == 5)
    for kind, params, weights in CASES:
        weights = weights[:n] if weights and n > 1 else None
        method = get_method(kind, **params)
        expected = run(False, models, method, SCALES, 1200, weights=weights)
        assert not calls  # compiled=False: the torch path
        got = run(True, models, method, SCALES, 1200, weights=weights)
        assert len(calls) == 2  # two jobs, one call each (one thread)
        calls.clear()
        assert_same(got, expected, (kind, params, weights))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_bit_for_bit(calls, dtype):
    """NaN (either sign, signalling, with payloads), inf and -0 in the base and the fine-tunes:
    the NaNs torch's adds pass on (the second operand's where both are NaN), inf - inf, inf * 0
    of a dropped entry, NaN keys at the TIES threshold. float16 inputs holding
    a NaN are widened again the torch path's way (a second call of the loop for that job)."""
    for n in (1, 2, 5):
        models = with_specials(make_models(n, dtype, seed=10 + n), seed=n)
        for kind, params, weights in CASES:
            weights = weights[:n] if weights and n > 1 else None
            method = get_method(kind, **params)
            expected = run(False, models, method, SCALES[:2], 1200, weights=weights)
            got = run(True, models, method, SCALES[:2], 1200, weights=weights)
            assert len(calls) == (4 if dtype == torch.float16 else 2)
            calls.clear()
            assert_same(got, expected, (n, kind, params, weights))


@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                 (torch.float16, torch.bfloat16), (torch.float64, torch.bfloat16),
                                                 (torch.float64, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_output_dtype_differs_from_input(calls, in_dtype, out_dtype):
    """The loop writes the accumulation dtype and torch's copy_ rounds it, as in the torch path
    (NaNs included: torch rounds a NaN to bfloat16 differently in a vector's body and tail)."""
    models = with_specials(make_models(3, in_dtype, seed=4, generic=True), seed=4)
    for kind, params in [("dare-ties", dict(density=0.7, seed=1)), ("ties", dict(density=0.2))]:
        method = get_method(kind, **params)
        expected = run(False, models, method, [1.0, -0.25], 10_000, out_dtype, weights=DYADIC[:3])
        got = run(True, models, method, [1.0, -0.25], 10_000, out_dtype, weights=DYADIC[:3])
        assert calls
        assert_same(got, expected, (kind, in_dtype, out_dtype))


SMALL = {"a.weight": (7, 13), "b.bias": (5,), "c.weight": (3, 1, 11), "e.weight": (2, 700)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_chunking_gives_the_same_bytes(calls, dtype):
    """Tensors cut every 5 or 64 elements, or one job of everything (e.weight spans tiles of the
    loop): the torch path's bytes, and the same for every chunking (DARE's index and TIES's count
    of ties at the threshold carried across chunks)."""
    models = make_models(3, dtype, seed=9, shapes=SMALL)
    for kind, params in [("ties", dict(density=0.2)), ("dare-ties", dict(density=0.3, seed=11)),
                         ("dare", dict(density=0.9, seed=5))]:
        method = get_method(kind, **params)
        whole = run(True, models, method, [0.5, 2.0], 10_000)
        assert_same(whole, run(False, models, method, [0.5, 2.0], 10_000), (kind, "torch"))
        for chunk in (5, 64):
            cut = run(True, models, method, [0.5, 2.0], chunk)
            assert_same(cut, whole, (kind, chunk))
        assert_same(cut, run(False, models, method, [0.5, 2.0], 64), (kind, 64, "torch"))
    assert len(calls) == 3 * (1 + len(make_jobs(models, 5, dtype)) + len(make_jobs(models, 64, dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ties_at_the_threshold_keep_the_lowest_indices(calls, monkeypatch, dtype):
    """|tau| takes 4 values, so the threshold has about a thousand ties and the quota fills in the
    middle of a chunk: the loop keeps the entries the torch path keeps (the lowest indices),
    counting across chunks. One-hot weights show each input's kept entries on their own."""
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(3001, dtype=dtype)
    fts = [(torch.randint(-3, 4, (3001,), generator=g) / 8).to(dtype) for _ in range(2)]
    models = [{"t": base}, *({"t": f} for f in fts)]
    method = get_method("ties", density=0.35)
    cuts = []
    keep_rule = MagnitudeThresholds.keep_rule

    def spy(self, name, index, numel, tau):
        result = keep_rule(self, name, index, numel, tau)
        cuts.append(0 <= result[1] < numel - 1)  # some ties at T kept in this chunk, some not
        return result

    monkeypatch.setattr(MagnitudeThresholds, "keep_rule", spy)
    for weights in (None, [1.0, 0.0], [0.0, 1.0]):
        expected = run(False, models, method, [-1.0], 900, weights=weights)
        got = run(True, models, method, [-1.0], 900, weights=weights)
        assert_same(got, expected, weights)
        if weights:
            kept = got[0]["t"] != 0
            assert int(kept.sum()) == int(0.35 * 3001)  # exactly k entries: T's ties cut at the quota
    assert any(cuts) and calls


def test_dare_masks_are_sparsifys_for_any_input_tensor_and_index(calls):
    """With one-hot weights tau is input i's dropped and rescaled task vector alone, so the output
    shows input i's mask: random_keep's, and the scalar splitmix64 of sparsify.py, at a start far
    into the tensor and for the largest seed."""
    numel, start, density = 3000, 10**9 + 17, 0.37
    spans = [SimpleNamespace(name="transformer.h.0.attn.c_attn.weight", start=start, numel=numel)]
    base = torch.zeros(numel)
    fts = [torch.ones(numel) for _ in range(3)]
    limit = int(density * 2**32)
    for seed in (0, 2**32 - 1):
        for i in range(3):
            out = torch.empty(numel)
            sparse_combine_cpu(base, fts, spans, [-1.0], [out], sparsify="random", consensus="mean", density=density,
                               seed=seed, weights=[float(j == i) for j in range(3)])
            kept = out != 0
            assert torch.equal(kept, random_keep(seed, spans[0].name, i, start, numel, density, "cpu")), (seed, i)
            key = stream_key(seed, spans[0].name, i)
            scalar = [splitmix64((key + start + j) & (2**64 - 1)) >> 32 < limit for j in range(100)]
            assert kept[:100].tolist() == scalar
            assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1.0) / torch.tensor(density))
    assert len(calls) == 6


def test_threads_split_a_job_into_element_ranges(calls, monkeypatch):
    """With a pool, a job runs as `threads` element ranges (cutting segments and tiles): the same
    bytes as one call."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 100)
    sizes = [1, 1500, 17, 2100]
    spans, position = [], 0
    for i, size in enumerate(sizes):
        spans.append(SimpleNamespace(name=f"t{i}", start=3 * i, numel=size))
        position += size
    g = torch.Generator().manual_seed(3)
    base = torch.randn(position, generator=g)
    fts = [base + torch.randn(position, generator=g) for _ in range(3)]
    for kind, params in [("dare-ties", dict(density=0.5, seed=5)), ("dare", dict(density=0.5, seed=5))]:
        fused = get_method(kind, **params).fused()
        options = dict(sparsify=fused.sparsify, consensus=fused.consensus, density=fused.density, seed=fused.seed)
        one = [torch.empty(position) for _ in range(2)]
        sparse_combine_cpu(base, fts, spans, [1.0, -2.0], one, **options)
        split = [torch.empty(position) for _ in range(2)]
        with ThreadPoolExecutor(3) as pool:
            sparse_combine_cpu(base, fts, spans, [1.0, -2.0], split, threads=3, pool=pool, **options)
        assert all(same_bits(a, b) for a, b in zip(split, one, strict=True)), kind
    assert calls[1:4] == [(0, 1206), (1206, 2412), (2412, 3618)]


def test_no_fused_multiply_add_in_the_machine_code():
    """The loop compiled with its own options (the decorator's, less the disk cache, which
    disables inspection) has no FMA instruction: numba leaves contraction off unless fastmath is
    asked, and that is what keeps two roundings in the output step and the torch path's bytes."""
    options = {k: v for k, v in cpu._combine.targetoptions.items() if k not in ("cache", "nopython")}
    loop = numba.njit(**options)(cpu._combine.py_func)
    n = 2048
    base = torch.zeros(n)
    out = torch.empty(n)
    fts = [torch.ones(n), torch.full((n,), 2.0)]
    bounds, keys, rules = cpu._tables([SimpleNamespace(name="t", start=0, numel=n)], 2, "random", 0.5, 0, None)
    floats = cpu.float_table(2, [1.0], torch.float32, density=0.5, weights=[1.0, 2.0]).numpy()
    at = torch.tensor([f.data_ptr() for f in fts]).numpy()
    loop(base.numpy(), at, torch.tensor([out.data_ptr()]).numpy(), 0, n, bounds, keys, rules, floats,
         int(0.5 * 2**32), 2, 1, True)
    (asm,) = loop.inspect_asm().values()
    assert not re.findall(r"\bv?f(n?m(add|sub)|ma)", asm, re.IGNORECASE)
    assert re.findall(r"\bv?(mul|add)p[sd]\b", asm)  # the loops are vectorised (packed arithmetic)


def test_bad_arguments_are_one_line_errors():
    base = torch.zeros(8)
    fts = [torch.ones(8)]
    spans = [SimpleNamespace(name="t", start=0, numel=8)]
    out = torch.empty(8)
    for kwargs, message in [
        (dict(spans=[SimpleNamespace(name="t", start=0, numel=7)]), "the segments hold 7 elements, the chunk 8"),
        (dict(sparsify="top"), "unknown sparsifier 'top'"),
        (dict(sparsify="magnitude"), "magnitude needs one (threshold, cutoff)"),
        (dict(consensus="median"), "unknown consensus 'median'"),
        (dict(weights=[1.0, 2.0]), "2 weights for 1 inputs"),
        (dict(outs=[out, out]), "1 scales but 2 outputs"),
        (dict(outs=[torch.empty(8, dtype=torch.float64)]), "outs[0] must be a contiguous CPU torch.float32"),
        (dict(finetuned=[torch.ones(8, dtype=torch.float64)]), "finetuned[0] must be a contiguous CPU tensor"),
        (dict(base=torch.zeros(8, dtype=torch.int32)), "base has dtype torch.int32"),
    ]:
        arguments = {"base": base, "finetuned": fts, "spans": spans, "outs": [out], **kwargs}
        with pytest.raises(TaskvecError, match=re.escape(message)) as error:
            sparse_combine_cpu(arguments.pop("base"), arguments.pop("finetuned"), arguments.pop("spans"), [1.0],
                               arguments.pop("outs"), **arguments)
        assert "\n" not in str(error.value)


def merged_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("**/*.safetensors"))}


@pytest.mark.parametrize("method, options", [
    ("ties", dict(density=0.3)),
    ("dare", dict(density=0.5, seed=9, weights=[1.0, 2.0, 0.5, 1.0, 3.0])),
    ("dare-ties", dict(density=0.4, seed=1, scale=[1.0, -0.5], dtype="bfloat16")),
], ids=["ties", "dare-weights", "dare-ties-scales-bf16"])
def test_merge_checkpoints_writes_the_same_files_with_the_switch_on_and_off(synthetic_sets, tmp_path, monkeypatch,
                                                                            calls, method, options):
    """The public entry, on a tiny GPT-2 and five fine-tunes, chunks that cut tensors: the
    merged files are byte-identical whether the CPU runs the compiled loop or the torch path."""
    sset = synthetic_sets("float32")
    written = {}
    for compiled in (False, True):
        monkeypatch.setattr(general, "COMPILED", compiled)
        out = tmp_path / f"compiled-{compiled}"
        merge_checkpoints(sset.finetuned, out, base=sset.base, method=method, chunk_size=40_000, progress=False,
                          **options)
        written[compiled] = merged_bytes(out)
        assert bool(calls) == compiled
    assert written[True] and written[True] == written[False]
