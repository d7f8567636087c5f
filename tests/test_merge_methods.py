"""Merge methods beyond the plain mean (issue 17): weighted mean, TIES, DARE, dare-ties.

Every method is checked against a float64 reference written here from its definition (not from
taskvec's code): odd shapes, exact ties in magnitude, every float dtype, N = 1, 2, 5, chunk sizes
that cut tensors (identical bytes), TIES against mergekit's own functions and mergekit-yaml, DARE's
mask against a scalar re-implementation of the counter-based hash and its kept fraction.
"""

import json
import math
import subprocess
import zlib

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from taskvec.merge import merge_checkpoints

from helpers import TINY, UNIT_ROUNDOFF, assert_close_to_reference, error_bound, load_dir

SHAPES = {"a.weight": (7, 13), "b.bias": (5,), "c.weight": (3, 1, 11), "d.scale": (1,), "e.weight": (2, 50)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def write_models(root, n, dtype, seed=0):
    """A base and n fine-tunes of quantized values (multiples of 1/8): many exact ties in |tau|,
    exact in every dtype; and an integer buffer, copied from the base."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-8, 9, s, generator=g) / 4 for k, s in SHAPES.items()}
    paths = []
    for i in range(n + 1):
        tensors = base if i == 0 else {k: v + torch.randint(-6, 7, v.shape, generator=g) / 8 for k, v in base.items()}
        directory = root / ("base" if i == 0 else f"ft-{i - 1}")
        directory.mkdir(parents=True)
        stored = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        stored["f.position_ids"] = torch.arange(4, dtype=torch.int64)
        save_file(stored, directory / "model.safetensors")
        paths.append(directory)
    return paths[0], paths[1:]


# ---- float64 references, from the definitions -------------------------------------------------

def _mix(z):
    m = 2**64 - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def dare_mask_f64(seed, name, index, numel, density):
    """DARE's documented mask: key = sm(sm(seed << 32 | crc32(name)) ^ index); keep j iff
    sm(key + j) >> 32 < int(density * 2**32); sm = splitmix64. Scalar Python ints."""
    key = _mix(_mix((seed << 32) | zlib.crc32(name.encode())) ^ index)
    limit = int(density * 2**32)
    return torch.tensor([(_mix((key + j) & (2**64 - 1)) >> 32) < limit for j in range(numel)])


def topk_mask_f64(tau, density):
    """The k = max(1, int(density * numel)) largest |tau|, ties by lowest element index."""
    flat = tau.flatten()
    if density >= 1:
        return torch.ones_like(flat, dtype=torch.bool).view(tau.shape)
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda j: (-abs(flat[j].item()), j))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(tau.shape)


def disjoint_mean_f64(deltas, weights):
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(weighted) == elected
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def method_f64(method, base, fts, name, density=1.0, seed=0, weights=None):
    """tau of one tensor, in float64."""
    weights = weights or [1.0] * len(fts)
    taus = [f.double() - base.double() for f in fts]
    if method == "negated_mean":
        return sum(w * t for w, t in zip(weights, taus, strict=True)) / sum(weights)
    if method == "ties":
        kept = [t * topk_mask_f64(t, density) for t in taus]
        return disjoint_mean_f64(torch.stack(kept), weights)
    kept = [t * dare_mask_f64(seed, name, i, t.numel(), density).view(t.shape) / density
            for i, t in enumerate(taus)]
    if method == "dare":
        return sum(w * t for w, t in zip(weights, kept, strict=True)) / sum(weights)
    return disjoint_mean_f64(torch.stack(kept), weights)


def tau_bound(base, fts, scale, reference, out_dtype, n_terms):
    """|taskvec - reference|: float32 rounding of the taus, weighted sums and the division over
    n_terms terms, relative to |base| + |scale| * max_i |tau_i| (2x slack), then the output dtype."""
    biggest = torch.stack([(f.double() - base.double()).abs() for f in fts]).max(0).values
    magnitudes = base.double().abs() + abs(scale) * biggest * n_terms
    accumulate = 2 * (n_terms + 4) * UNIT_ROUNDOFF[torch.float32] * magnitudes
    if out_dtype in (torch.float32, torch.float64):
        return accumulate
    return accumulate * (1 + UNIT_ROUNDOFF[out_dtype]) + UNIT_ROUNDOFF[out_dtype] * reference.abs() + TINY[out_dtype]


def merge(fts, out, base, **kwargs):
    kwargs.setdefault("progress", False)
    return merge_checkpoints(fts, out, base=base, **kwargs)


def weight_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


CASES = [("ties", dict(density=0.3)), ("ties", dict(density=1.0)), ("ties", dict(density=0.01)),
         ("dare", dict(density=0.5, seed=7)), ("dare", dict(density=1.0)), ("dare-ties", dict(density=0.4, seed=3))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("method, params", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_methods_match_float64_and_do_not_depend_on_the_chunk_size(tmp_path, dtype, n, method, params):
    base, fts = write_models(tmp_path / "in", n, dtype, seed=n)
    scale = 0.75
    merge(fts, tmp_path / "big", base, method=method, scale=scale, **params)
    merge(fts, tmp_path / "small", base, method=method, scale=scale, chunk_size=52, **params)
    assert weight_files(tmp_path / "big") == weight_files(tmp_path / "small")  # chunk size: same bytes
    got, b = load_dir(tmp_path / "big"), load_dir(base)
    f = [load_dir(p) for p in fts]
    for name in SHAPES:
        tau = method_f64(method, b[name], [x[name] for x in f], name, **params)
        reference = b[name].double() - scale * tau
        bound = tau_bound(b[name], [x[name] for x in f], scale, reference, dtype, n)
        assert got[name].dtype == dtype
        assert_close_to_reference(got[name], reference, bound, f"{method} {name}")
    assert torch.equal(got["f.position_ids"], torch.arange(4))
    provenance = json.loads((tmp_path / "big" / "taskvec.json").read_text())
    assert provenance["method"] == method and provenance["params"]["density"] == params["density"]


@pytest.mark.parametrize("method, params", [("negated_mean", {}), ("ties", dict(density=0.3)),
                                            ("dare", dict(density=0.6, seed=1)), ("dare-ties", dict(density=0.6))])
def test_weighted_means_match_float64(tmp_path, method, params):
    weights = [1.0, math.pi, 0.3]  # no exact cancellation in the sign election (ill-posed to round)
    base, fts = write_models(tmp_path / "in", 3, torch.float32, seed=11)
    merge(fts, tmp_path / "out", base, method=method, scale=[1.0, -0.5], weights=weights, **params)
    merge(fts, tmp_path / "cut", base, method=method, scale=[1.0, -0.5], weights=weights, chunk_size=52, **params)
    b, f = load_dir(base), [load_dir(p) for p in fts]
    for scale in (1.0, -0.5):
        directory = tmp_path / "out" / f"scale-{scale:g}"
        got = load_dir(directory)
        assert weight_files(directory) == weight_files(tmp_path / "cut" / directory.name)
        for name in SHAPES:
            tau = method_f64(method, b[name], [x[name] for x in f], name, weights=weights, **params)
            reference = b[name].double() - scale * tau
            bound = tau_bound(b[name], [x[name] for x in f], scale, reference, torch.float32, 3)
            bound = bound * max(weights) / min(weights)
            assert_close_to_reference(got[name], reference, bound, f"{method} weighted {name}")
        provenance = json.loads((tmp_path / "out" / f"scale-{scale:g}" / "taskvec.json").read_text())
        exponent = math.frexp(max(weights))[1]  # the weights as applied: scaled exactly by a power of two
        assert provenance["weights"] == [math.ldexp(w, -exponent) for w in weights]
        if method == "negated_mean":  # what it records is the arithmetic: base_coef * base + sum_coef * sum w_i ft_i
            for name in SHAPES:
                rebuilt = provenance["base_coef"] * b[name].double() + provenance["sum_coef"] * sum(
                    w * x[name].double() for w, x in zip(provenance["weights"], f, strict=True))
                bound = tau_bound(b[name], [x[name] for x in f], scale, rebuilt, torch.float32, 3)
                assert_close_to_reference(got[name], rebuilt, bound * max(weights) / min(weights), name)
    unweighted = merge(fts, tmp_path / "plain", base, method=method, scale=1.0, **params)
    assert weight_files(unweighted.output) != weight_files(tmp_path / "out" / "scale-1")  # the weights matter


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weighted_mean_on_a_model_matches_float64(synthetic_sets, tmp_path, dtype):
    sset = synthetic_sets(dtype)
    weights, scale = [0.2, 1.0, 2.5, 0.7], 1.25
    merge(sset.finetuned[:4], tmp_path / "out", sset.base, scale=scale, weights=weights)
    got, b, f = load_dir(tmp_path / "out"), load_dir(sset.base), [load_dir(p) for p in sset.finetuned[:4]]
    total = sum(weights)
    for name in b:
        if not b[name].is_floating_point():
            continue
        mean = sum(w * x[name].double() for w, x in zip(weights, f, strict=True)) / total
        reference = b[name].double() - scale * (mean - b[name].double())
        bound = error_bound(b[name], [w * x[name].double() for w, x in zip(weights, f, strict=True)],
                            1 + scale, -scale / total, reference, got[name].dtype)
        assert_close_to_reference(got[name], reference, bound, name)


@pytest.mark.parametrize("method, params", [("negated_mean", {}), ("ties", dict(density=0.3)),
                                            ("dare", dict(density=0.6, seed=1)), ("dare-ties", dict(density=0.6))])
def test_weights_only_count_by_their_ratios(tmp_path, method, params):
    """1e-50,2e-50 is 1,2: such weights underflowed the kernels' float32 tables (NaN or inf with
    exit 0, or the base itself for ties). Weights a power of two apart give the same bytes."""
    base, fts = write_models(tmp_path / "in", 2, torch.float32, seed=4)
    merge(fts, tmp_path / "plain", base, method=method, weights=[1.0, 2.0], **params)
    plain = load_dir(tmp_path / "plain")
    for tiny in ([2.0**-166, 2.0**-165], [2.0**-146, 2.0**-145], [1e-50, 2e-50], [1e-44, 2e-44]):
        merge(fts, tmp_path / "tiny", base, method=method, weights=tiny, overwrite=True, **params)
        small = load_dir(tmp_path / "tiny")
        if math.log2(tiny[0]).is_integer():
            assert all(torch.equal(plain[k], small[k]) for k in plain), tiny
        else:  # other ratios round as such: float32's rounding, no more
            assert all(torch.allclose(plain[k], small[k], rtol=1e-6, atol=1e-6) for k in plain), tiny


def test_equal_weights_are_the_plain_mean_byte_for_byte(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    plain = merge(sset.finetuned[:3], tmp_path / "plain", sset.base, scale=[0.5, 1.0])
    equal = merge(sset.finetuned[:3], tmp_path / "equal", sset.base, scale=[0.5, 1.0], weights=[2, 2, 2])
    for a, b in zip(plain.outputs, equal.outputs, strict=True):
        assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}


@pytest.mark.parametrize("method, params", [("ties", dict(density=0.2)), ("dare", dict(density=0.3, seed=5)),
                                            ("dare-ties", dict(density=0.3, seed=5))])
def test_scale_lists_chunk_sizes_and_seeds_on_a_model(synthetic_sets, tmp_path, method, params):
    sset = synthetic_sets("bfloat16", sharded=True)
    scales = [0.5, 1.0, -1.0]
    many = merge(sset.finetuned, tmp_path / "many", sset.base, method=method, scale=scales, **params)
    for scale, directory in zip(scales, many.outputs, strict=True):
        single = merge(sset.finetuned, tmp_path / f"one{scale}", sset.base, method=method, scale=scale,
                       chunk_size=65536, **params)  # cuts wte and c_fc: TIES's histogram path
        assert weight_files(directory) == weight_files(single.output), scale
    if method != "ties":
        again = merge(sset.finetuned, tmp_path / "again", sset.base, method=method, scale=1.0, **params)
        assert weight_files(again.output) == weight_files(many.outputs[1])  # the seed determines it
        other = merge(sset.finetuned, tmp_path / "other", sset.base, method=method, scale=1.0,
                      **{**params, "seed": 6})
        assert weight_files(other.output) != weight_files(many.outputs[1])


def test_dare_mask_is_the_counter_hash_and_keeps_density(tmp_path):
    from taskvec.methods.sparsify import random_keep

    for seed, name, index, start in [(0, "a", 0, 0), (2**32 - 1, "transformer.h.0.attn.c_attn.weight", 4, 10**9)]:
        got = random_keep(seed, name, index, start, 300, 0.37, "cpu")
        key = _mix(_mix((seed << 32) | zlib.crc32(name.encode())) ^ index)
        want = [(_mix((key + j) & (2**64 - 1)) >> 32) < int(0.37 * 2**32) for j in range(start, start + 300)]
        assert got.tolist() == want
    n = 1_000_000
    for density in (0.1, 0.5, 0.9):
        a = random_keep(3, "w", 0, 0, n, density, "cpu")
        b = random_keep(3, "w", 1, 0, n, density, "cpu")
        c = random_keep(4, "w", 0, 0, n, density, "cpu")
        for mask in (a, b, c):  # binomial: 5 standard deviations
            assert abs(mask.double().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / n)
        for pair in (a & b, a & c):  # inputs and seeds draw independently
            assert abs(pair.double().mean().item() - density**2) < 5 * math.sqrt(density**2 * (1 - density**2) / n)
        assert torch.equal(random_keep(3, "w", 0, 1000, 5000, density, "cpu"), a[1000:6000])


def test_dare_kept_fraction_in_a_merge(synthetic_sets, tmp_path):
    sset = synthetic_sets("float32")
    density = 0.3
    merge(sset.finetuned[:1], tmp_path / "out", sset.base, method="dare", density=density, seed=9, scale=-1.0)
    got, b, f = load_dir(tmp_path / "out"), load_dir(sset.base), load_dir(sset.finetuned[0])
    name = "transformer.wte.weight"
    tau = f[name].double() - b[name].double()
    moved = (got[name].double() - b[name].double())
    kept = moved != 0
    n = int((tau != 0).sum())
    assert abs(kept[tau != 0].double().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / n)
    torch.testing.assert_close(moved[kept], tau[kept] / density, rtol=1e-5, atol=1e-6)


def test_ties_matches_mergekits_functions(tmp_path):
    mergekit = pytest.importorskip("mergekit")
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import magnitude

    del mergekit
    g = torch.Generator().manual_seed(5)
    shapes = [(7, 13), (5,), (3, 1, 11), (257, 33)]
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}  # no ties in |tau|
    for weights in ([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 3.0, 0.25]):
        fts = [{k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()} for _ in weights]
        root = tmp_path / f"w{weights[1]}"
        for i, tensors in enumerate([base, *fts]):
            (root / str(i)).mkdir(parents=True)
            save_file(tensors, root / str(i) / "model.safetensors")
        merge([root / str(i) for i in range(1, 6)], root / "out", root / "0", method="ties", density=0.3,
              scale=-1.0, weights=weights, chunk_size=1000)
        got = load_dir(root / "out")
        for name, b in base.items():
            deltas = torch.stack([magnitude(ft[name] - b, density=0.3) for ft in fts])  # mergekit's merge_group
            w = torch.tensor(weights).view(-1, *[1] * b.dim())
            deltas.mul_(w)
            mask = get_mask(deltas, method="sum")
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
            expected = b + (deltas * mask).sum(0) / divisor
            torch.testing.assert_close(got[name], expected, rtol=2e-6, atol=1e-7)


def test_ties_matches_mergekit_yaml(synthetic_sets, tmp_path):
    from benchmarks.mergekit_runner import mergekit_yaml

    executable = mergekit_yaml()
    if executable is None:
        pytest.skip("mergekit is not installed")
    sset = synthetic_sets("float32")
    config = {"merge_method": "ties", "base_model": str(sset.base), "dtype": "float32", "out_dtype": "float32",
              "parameters": {"normalize": True},
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.25}} for p in sset.finetuned]}
    (tmp_path / "ties.yaml").write_text(json.dumps(config))
    subprocess.run([executable, str(tmp_path / "ties.yaml"), str(tmp_path / "mergekit"), "--quiet"], check=True,
                   capture_output=True)
    merge(sset.finetuned, tmp_path / "ours", sset.base, method="ties", density=0.25, scale=-1.0)
    ours, theirs = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mergekit")
    compared = 0
    for name, value in ours.items():
        if name in theirs and value.is_floating_point():
            torch.testing.assert_close(value, theirs[name], rtol=2e-6, atol=1e-7, msg=name)
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize("args, message", [
    (["--method", "ties"], "ties needs --density"),
    (["--method", "ties", "--density", "0"], "--density must be in (0, 1]"),
    (["--method", "dare", "--density", "1.5"], "--density must be in (0, 1]"),
    (["--method", "dare", "--density", "nan"], "--density must be in (0, 1]"),
    # below the mask's resolution nothing is kept, and float32(1e-46) = 0 filled the output with NaN
    (["--method", "dare", "--density", "1e-46"], "--density must be at least 2**-32 (2.3e-10) for dare and dare-ties"),
    (["--method", "dare-ties", "--density", "1e-12"], "--density must be at least 2**-32"),
    (["--method", "dare", "--density", "0.5", "--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--method", "dare", "--density", "0.5", "--seed", str(2**32)], "--seed must be in 0..4294967295"),
    (["--density", "0.5"], "negated_mean takes no parameter 'density'"),
    (["--weights", "1,2"], "--weights has 2 values for 3 fine-tuned checkpoints"),
    (["--method", "ties", "--density", "0.5", "--weights", "1,-1,1"], "--weights must be finite and >= 0"),
    (["--weights", "0,0,0"], "positive sum"),
    (["--weights", "1,x,2"], "not a comma-separated list of numbers"),
    (["--method", "mean"], "Invalid value for '--method'"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, args, message):
    from taskvec.cli import main

    base, fts = write_models(tmp_path / "in", 3, torch.float32)
    command = ["merge", "--base", str(base), *map(str, fts), "-o", str(tmp_path / "out"), *args]
    result = CliRunner().invoke(main, command)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "Error" in line]) == 1
    assert not (tmp_path / "out").exists()


def test_the_cli_runs_each_method(tmp_path):
    from taskvec.cli import main

    base, fts = write_models(tmp_path / "in", 2, torch.float32)
    for method, extra in [("ties", ["--density", "0.3"]), ("dare", ["--density", "0.5", "--seed", "3"]),
                          ("dare-ties", ["--density", "0.5"]), ("negated_mean", ["--weights", "1,2"])]:
        out = tmp_path / method
        result = CliRunner().invoke(main, ["merge", "--base", str(base), *map(str, fts), "-o", str(out),
                                           "--method", method, "--scale", "0.5,1", *extra])
        assert result.exit_code == 0, result.output
        assert (out / "scale-0.5" / "model.safetensors").is_file()
        provenance = json.loads((out / "scale-1" / "taskvec.json").read_text())
        assert provenance["method"] == method
        direct = merge(fts, tmp_path / f"{method}-api", base, method=method, scale=1.0,
                       **({"weights": [1, 2]} if method == "negated_mean" else
                          {"density": float(extra[1]), **({"seed": 3} if "--seed" in extra else {})}))
        assert weight_files(direct.output) == weight_files(out / "scale-1")
