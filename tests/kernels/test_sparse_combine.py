"""The fused non-linear kernel (kernels/sparse_combine.py) against the general executor's torch path,
bit for bit, and against float64 references written here from the methods' definitions.

Both paths run through the real executor (`TorchExecutor.run`: statistics passes, prefetching,
the kernel's wiring) on an in-memory plan, so chunk boundaries that cut tensors, packed small
tensors, TIES's pre-pass and its count of ties at the threshold are those of a merge. Inputs are
multiples of 1/8 (exact in every dtype, many exact ties in |tau|). On CPU the kernel runs in
Triton's interpreter; with a GPU the same tests run it on `cuda`.
"""

import re
import zlib
from types import SimpleNamespace

import pytest
import torch
from memory_merge import SHAPES, MemoryReader, MemoryWriter, NoProgress, make_jobs, make_models

from helpers import TINY, UNIT_ROUNDOFF, assert_close_to_reference

pytest.importorskip("triton")

from ptx_tools import run_ptx  # noqa: E402

from taskvec.errors import TaskvecError  # noqa: E402
from taskvec.kernels import sparse_combine  # noqa: E402
from taskvec.kernels.sparse_combine import sparse_combine_triton  # noqa: E402
from taskvec.methods import ChunkContext, get_method  # noqa: E402
from taskvec.methods.sparsify import MagnitudeThresholds, random_keep  # noqa: E402
from taskvec.stream.general import TorchExecutor  # noqa: E402


@pytest.fixture
def kernel_launches(monkeypatch):
    """Every launch of the sparse kernel (its grid), so a test proves the kernel ran."""
    grids = []
    kernel = sparse_combine._sparse_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sparse_combine, "_sparse_combine_kernel", Spy())
    return grids



def run(executor, models, method, scales, chunk, out_dtype=None, weights=None):
    """One merge through `executor.run`: a dict of flat outputs per scale."""
    out_dtype = out_dtype or next(iter(models[0].values())).dtype
    jobs = make_jobs(models, chunk, out_dtype)
    plan = SimpleNamespace(jobs=jobs, n_inputs=len(models), buffer_bytes=max(j.numel for j in jobs) * 4)
    forms = method.forms(len(models) - 1, scales, weights)
    writers = [MemoryWriter(models, out_dtype) for _ in scales]
    executor.run(plan, forms, MemoryReader(models), writers, NoProgress())
    return [w.out for w in writers]


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- float64 references, from the definitions ------------------------------------------------

def _mix(z):
    m = 2**64 - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def dare_mask_f64(seed, name, index, start, numel, density):
    """keep j iff sm(sm(sm(seed << 32 | crc32(name)) ^ index) + j) >> 32 < int(density * 2**32)."""
    key = _mix(_mix((seed << 32) | zlib.crc32(name.encode())) ^ index)
    limit = int(density * 2**32)
    return torch.tensor([(_mix((key + j) & (2**64 - 1)) >> 32) < limit for j in range(start, start + numel)])


def topk_mask_f64(tau, density):
    """The max(1, int(density * numel)) largest |tau|, ties by the lowest element index."""
    k = max(1, int(density * tau.numel()))
    order = sorted(range(tau.numel()), key=lambda j: (-abs(tau[j].item()), j))
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def tau_f64(kind, base, fts, name, density, seed, weights):
    w = torch.tensor(weights or [1.0] * len(fts), dtype=torch.float64)[:, None]
    taus = torch.stack([f.double() - base.double() for f in fts])
    if kind in ("dare", "dare-ties"):
        keep = torch.stack([dare_mask_f64(seed, name, i, 0, base.numel(), density) for i in range(len(fts))])
        taus = taus * keep / density
    if kind == "ties" and density < 1:
        taus = taus * torch.stack([topk_mask_f64(t, density) for t in taus])
    weighted = taus * w
    if kind == "dare":
        return weighted.sum(0) / w.sum()
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(weighted) == elected
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def bound(base, fts, scale, reference, out_dtype, weights, density):
    """|result - float64|: tau_i = ft_i - base is exact (multiples of 1/512 below 3 in magnitude),
    so are the masks, and each of the <= 2N + 4 float32 operations after them (DARE's
    division, the weighting, the N-term sums, the division by N or by the weights, the scale's
    product, the add of the base) rounds once, by at most one unit roundoff of its result. Every
    partial result is at most M = N * max_i w_i |tau_i| / density / min(w) (the disjoint mean's
    quotient divides by at least the smallest weight), or |base| + |scale| * M for the output
    step, so (2N + 4) u32 (|base| + |scale| M), doubled for slack, bounds the float32 error; a
    16-bit output adds its own rounding of the result (one unit roundoff, or half a subnormal
    step). The sign election must come out as in float64: dyadic weights and densities keep its
    sums exact; the generic weights go only to dare (a mean, no election) and to ties at density
    0.05, whose kept |tau| (the top 5%, above 1.1) can cancel no other kept entry's weighted tau."""
    n = len(fts)
    w = torch.tensor(weights or [1.0] * n, dtype=torch.float64)
    biggest = torch.stack([(f.double() - base.double()).abs() * wi for f, wi in zip(fts, w, strict=True)]).max(0)
    magnitude = base.double().abs() + abs(scale) * biggest.values / density * n / w.min()
    accumulate = 2 * (2 * n + 4) * UNIT_ROUNDOFF[torch.float32] * magnitude
    if out_dtype == torch.float32:
        return accumulate
    return accumulate * (1 + UNIT_ROUNDOFF[out_dtype]) + UNIT_ROUNDOFF[out_dtype] * reference.abs() + TINY[out_dtype]


# ---- the kernel against the torch path and float64 -------------------------------------------

DYADIC = [0.5, 2.0, 1.0, 3.0, 0.25]
GENERIC = [1.0, 3.14159, 0.3, 2.7182818, 1.41421356]
CASES = [  # method, parameters, weights (N = 1: none); dare-ties' density dyadic (see `bound`)
    ("ties", dict(density=0.3), None),
    ("ties", dict(density=1.0), DYADIC),
    ("dare", dict(density=0.5, seed=7), None),
    ("dare", dict(density=0.6, seed=2**32 - 1), GENERIC),
    ("dare-ties", dict(density=0.5, seed=3), DYADIC),
    ("ties", dict(density=0.05), GENERIC),
]
SCALES = [0.75, -1.5, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("kind, params, weights", CASES, ids=[f"{c[0]}-{c[1]['density']}-w{bool(c[2])}" for c in CASES])
def test_kernel_equals_the_torch_path_and_float64(device, kernel_launches, dtype, n, kind, params, weights):
    """chunk 1200: a.weight (1517 elements) cut in two; the first job has a full 1024-element
    block inside it (the unmasked path) and a tail, the second packs a.weight's rest with the
    small tensors (blocks spanning several segments)."""
    models = make_models(n, dtype, seed=n)
    weights = weights[:n] if weights and n > 1 else None
    method = get_method(kind, **params)
    expected = run(TorchExecutor("cpu"), models, method, SCALES, 1200, weights=weights)
    assert not kernel_launches  # the CPU executor's default is the torch path
    got = run(TorchExecutor(device, kernel=True), models, method, SCALES, 1200, weights=weights)
    assert len(kernel_launches) == len(make_jobs(models, 1200, dtype)) == 2
    base, fts = models[0], models[1:]
    taus = {name: tau_f64(kind, base[name], [f[name] for f in fts], name, params["density"], params.get("seed", 0),
                          weights) for name in SHAPES}
    for scale, out, want in zip(SCALES, got, expected, strict=True):
        for name in SHAPES:
            assert same_bits(out[name].cpu(), want[name]), (scale, name, (out[name].cpu() != want[name]).sum())
            reference = base[name].double() - scale * taus[name]
            limit = bound(base[name], [f[name] for f in fts], scale, reference, dtype, weights, params["density"])
            assert_close_to_reference(out[name].cpu(), reference, limit, f"{kind} {name} scale {scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, params, weights", CASES[1:], ids=[f"{c[0]}-{c[1]['density']}" for c in CASES[1:]])
def test_generic_values_bit_for_bit(device, kernel_launches, dtype, kind, params, weights):
    """Normal deviates, N = 5: every rounding of the torch path shows in the last bits."""
    models = make_models(5, dtype, seed=21, generic=True)
    method = get_method(kind, **params)
    expected = run(TorchExecutor("cpu"), models, method, SCALES, 1200, weights=weights)
    got = run(TorchExecutor(device, kernel=True), models, method, SCALES, 1200, weights=weights)
    assert kernel_launches
    for out, want in zip(got, expected, strict=True):
        for name in SHAPES:
            assert same_bits(out[name].cpu(), want[name]), (name, (out[name].cpu() != want[name]).sum())


@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                 (torch.float16, torch.bfloat16)], ids=str)
def test_output_dtype_differs_from_input(device, kernel_launches, in_dtype, out_dtype):
    models = make_models(3, in_dtype, seed=4)
    method = get_method("dare-ties", density=0.7, seed=1)
    expected = run(TorchExecutor("cpu"), models, method, [1.0, -0.25], 10_000, out_dtype)
    got = run(TorchExecutor(device, kernel=True), models, method, [1.0, -0.25], 10_000, out_dtype)
    assert kernel_launches
    for out, want in zip(got, expected, strict=True):
        for name in SHAPES:
            assert same_bits(out[name].cpu(), want[name]), name


SMALL = {"a.weight": (7, 13), "b.bias": (5,), "c.weight": (3, 1, 11)}


def test_the_chunking_does_not_change_the_kernels_bytes(device, kernel_launches):
    """Tensors cut every 5 elements, or one job of everything: the same bytes (DARE's index
    and TIES's count of ties at the threshold carried across chunks)."""
    models = make_models(3, torch.bfloat16, seed=9, shapes=SMALL)
    for kind, params in [("ties", dict(density=0.2)), ("dare-ties", dict(density=0.3, seed=11))]:
        method = get_method(kind, **params)
        whole = run(TorchExecutor(device, kernel=True), models, method, [0.5], 10_000)[0]
        for chunk in (5,):
            cut = run(TorchExecutor(device, kernel=True), models, method, [0.5], chunk)[0]
            for name in SMALL:
                assert same_bits(cut[name], whole[name]), (kind, chunk, name)
    assert len(kernel_launches) == 2 * (1 + len(make_jobs(models, 5, torch.bfloat16)))


def test_ties_at_the_threshold_keep_the_lowest_indices(device, kernel_launches, monkeypatch):
    """|tau| takes 4 values only, so the threshold has about a thousand ties and the quota of ties
    fills in the middle of a chunk: the kernel keeps the entries the torch path and the float64
    definition keep (the lowest indices), counting across chunks. One-hot weights show each
    input's kept entries on their own."""
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(3001)
    fts = [(torch.randint(-3, 4, (3001,), generator=g) / 8) for _ in range(2)]
    models = [{"t": base}, *({"t": f} for f in fts)]
    density = 0.35
    method = get_method("ties", density=density)
    cuts = []
    keep_rule = MagnitudeThresholds.keep_rule

    def spy(self, name, index, numel, tau):
        result = keep_rule(self, name, index, numel, tau)
        cuts.append(0 <= result[1] < numel - 1)  # some ties at T kept in this chunk, some not
        return result

    monkeypatch.setattr(MagnitudeThresholds, "keep_rule", spy)
    for weights in (None, [1.0, 0.0], [0.0, 1.0]):
        expected = run(TorchExecutor("cpu"), models, method, [-1.0], 900, weights=weights)[0]["t"]
        got = run(TorchExecutor(device, kernel=True), models, method, [-1.0], 900, weights=weights)[0]["t"]
        assert same_bits(got, expected), weights
        assert torch.equal(got.double(), tau_f64("ties", base, fts, "t", density, 0, weights))  # exact here
        if weights:
            i = weights.index(1.0)
            assert torch.equal(got != 0, topk_mask_f64(fts[i].double(), density)), i
    assert any(cuts)


def test_dare_masks_are_sparsifys_for_any_input_tensor_and_index(device, kernel_launches):
    """With one-hot weights tau is input i's dropped and rescaled task vector alone, so the output
    shows input i's mask: the same as random_keep's and as the scalar hash written here, at a
    start far into the tensor and for the largest seed."""
    numel, start, density = 3000, 10**9 + 17, 0.37
    spans = [SimpleNamespace(name="transformer.h.0.attn.c_attn.weight", start=start, numel=numel)]
    base = torch.zeros(numel, device=device)
    fts = [torch.ones(numel, device=device) for _ in range(3)]
    for seed in (0, 2**32 - 1):
        for i in range(3):
            out = torch.empty(numel, device=device)
            sparse_combine_triton(base, fts, spans, [-1.0], [out], sparsify="random", consensus="mean", density=density,
                                  seed=seed, weights=[float(j == i) for j in range(3)])
            kept = out.cpu() != 0
            assert torch.equal(kept, random_keep(seed, spans[0].name, i, start, numel, density, "cpu")), (seed, i)
            if i == 1:
                assert torch.equal(kept[:200], dare_mask_f64(seed, spans[0].name, i, start, 200, density))
            assert torch.equal(out.cpu()[kept], torch.full((int(kept.sum()),), 1.0) / torch.tensor(density))
    assert len(kernel_launches) == 6


def test_blocks_spanning_many_segments(device, kernel_launches):
    """16-element blocks over segments of 1, 3, 16, 17, 5 and 40 elements: blocks inside one
    segment, across two, across four; each segment's index and keys its own."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 3, 16, 17, 5, 40]
    spans = [SimpleNamespace(name=f"t{i}", start=7 * i, numel=s) for i, s in enumerate(sizes)]
    numel = sum(sizes)
    base = torch.randint(-8, 9, (numel,), generator=g) / 4
    fts = [base + torch.randint(-6, 7, (numel,), generator=g) / 8 for _ in range(3)]
    for kind, params in [("dare-ties", dict(density=0.5, seed=5)), ("dare", dict(density=0.5, seed=5))]:
        method = get_method(kind, **params)
        fused = method.fused()
        outs = [torch.empty(numel, device=device) for _ in range(2)]
        sparse_combine_triton(base.to(device), [f.to(device) for f in fts], spans, [1.0, -2.0], outs,
                              sparsify=fused.sparsify, consensus=fused.consensus, density=fused.density,
                              seed=fused.seed, block=16)
        position = 0
        for span in spans:
            piece = slice(position, position + span.numel)
            stack = torch.stack([f[piece] for f in fts])
            tau = method.combine(base[piece], stack, ChunkContext(span.name, span.start, 10**6))
            for scale, out in zip([1.0, -2.0], outs, strict=True):
                assert same_bits(out.cpu()[piece], torch.mul(tau, -scale).add_(base[piece])), (kind, span.name)
            position += span.numel
    assert kernel_launches and kernel_launches[0] == (-(-numel // 16),)


def test_bad_arguments_are_one_line_errors(device):
    base = torch.zeros(8, device=device)
    fts = [torch.ones(8, device=device)]
    spans = [SimpleNamespace(name="t", start=0, numel=8)]
    out = torch.empty(8, device=device)
    for kwargs, message in [
        (dict(spans=[SimpleNamespace(name="t", start=0, numel=7)]), "the segments hold 7 elements, the chunk 8"),
        (dict(sparsify="top"), "unknown sparsifier 'top'"),
        (dict(sparsify="magnitude"), "magnitude needs one (threshold, cutoff)"),
        (dict(consensus="median"), "unknown consensus 'median'"),
        (dict(weights=[1.0, 2.0]), "2 weights for 1 inputs"),
        (dict(outs=[out, out]), "1 scales but 2 outputs"),
        (dict(outs=[fts[0]]), "out overlaps finetuned[0]"),
    ]:
        arguments = {"spans": spans, "outs": [out], **kwargs}
        with pytest.raises(TaskvecError, match=re.escape(message)) as error:
            sparse_combine_triton(base, fts, arguments.pop("spans"), [1.0], arguments.pop("outs"), **arguments)
        assert "\n" not in str(error.value)


BODY = """
    from taskvec.kernels import sparse_combine as sc

    def counts(in_ty, out_ty, sparsify, consensus, weighted, aligned, fusion):
        names = ["base_ptr", "table_ptr", "outs_ptr", "ints_ptr", "floats_ptr", "n_ft", "n_out", "numel",
                 "key_at", "threshold_at", "cutoff_at", "bounds_at"]
        types = ["*" + in_ty, "*i64", "*i64", "*i64", "*fp32"] + ["i32"] * 7
        constexprs = {"SPARSIFY": sparsify, "CONSENSUS": consensus, "WEIGHTED": weighted, "BLOCK": 1024,
                      "ALIGNED": aligned, "OUT_DTYPE": {"fp32": tl.float32, "bf16": tl.bfloat16}[out_ty]}
        signature = {**dict(zip(names, types)), **{k: "constexpr" for k in constexprs}}
        code = ptx(sc._sparse_combine_kernel, signature, constexprs,
                   {(i,): [["tt.divisibility", 16]] for i in range(5)},
                   {"num_warps": 4, "enable_fp_fusion": fusion})
        patterns = [r"\\bfma\\.", r"\\bdiv\\.(?!rn\\.f32)", r"div\\.rn\\.f32", r"\\.ftz", r"ld\\.global\\.v4"]
        return [len(re.findall(p, code)) for p in patterns]

    print(json.dumps([counts(*case) for case in cases]))
"""


def test_ptx_for_sm90_has_no_fused_multiply_add_and_exact_divisions():
    """The launch's enable_fp_fusion=False is what keeps the bytes: with it, no fma (with fusion
    on, as in the last case, the compiler contracts the weighting, the sums and the output step),
    no approximate or flushing division, every division IEEE div.rn; aligned inputs' loads are
    128-bit vectors (fp32, 8 elements per thread: two per load of the base and the fine-tunes)."""
    cases = [["fp32", "fp32", 2, 1, True, True, False], ["fp32", "fp32", 2, 1, True, False, False],
             ["bf16", "bf16", 1, 1, False, True, True]]
    (fma, odd_div, div_rn, ftz, aligned), (fma2, odd2, _, ftz2, unaligned), (fused, *_) = run_ptx(BODY, cases)
    assert fma == fma2 == odd_div == odd2 == ftz == ftz2 == 0
    assert div_rn > 0
    assert aligned == 3 * unaligned > 0  # base, the first fine-tune and the loop's, vs the base alone
    assert fused > 0  # what enable_fp_fusion=False prevents
