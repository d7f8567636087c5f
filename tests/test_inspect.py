"""taskvec inspect against statistics computed here, independently, in float64 on whole tensors.

Each model is loaded whole with safetensors and flattened, as the original research scripts did;
every number inspect reports is recomputed from that. Sums are float64 (tolerance 1e-12 relative,
far above float64 rounding over a few thousand entries, far below any real error); counts and
histograms are integers and must match exactly, whatever the chunk size.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from cli_errors import refused
from click.testing import CliRunner
from safetensors.torch import save_file

from taskvec.cli import main
from taskvec.inspect import inspect_checkpoints
from taskvec.inspect.groups import group_of

from helpers import load_dir

# Odd shapes, a scalar, a LayerNorm near 1, and an integer buffer (skipped by inspect).
SHAPES = {
    "transformer.wte.weight": (37, 11),
    "transformer.wpe.weight": (5, 11),
    "transformer.h.0.ln_1.weight": (11,),
    "transformer.h.0.ln_1.bias": (11,),
    "transformer.h.0.attn.c_attn.weight": (11, 33),
    "transformer.h.0.attn.c_attn.bias": (33,),
    "transformer.h.0.attn.scale": (),
    "transformer.h.0.mlp.c_fc.weight": (11, 13),
    "transformer.h.0.mlp.c_proj.weight": (13, 7, 1),
    "transformer.ln_f.weight": (11,),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
N = 3


def _save(directory, tensors, shards=1):
    directory.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_models(root, dtype="float32"):
    """A base, N fine-tunes (one sharded) with a shared direction, own noise, exact zeros and
    magnitudes from 1e-6 to 1e-2, and their negated mean as a merged model."""
    generator = torch.Generator().manual_seed(7)
    kind = DTYPES[dtype]
    base = {}
    for name, shape in SHAPES.items():
        values = torch.randn(shape, generator=generator) * 0.02 + (1.0 if "ln_" in name and "weight" in name else 0)
        base[name] = values.to(kind)
    base["transformer.h.0.attn.step"] = torch.arange(3, dtype=torch.int64)
    scales = {name: 10.0 ** -(2 + k % 4) for k, name in enumerate(SHAPES)}
    shared = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    finetuned = []
    for _ in range(N):
        model = dict(base)
        for name, shape in SHAPES.items():
            delta = (shared[name] + torch.randn(shape, generator=generator)) * scales[name]
            delta *= torch.rand(shape, generator=generator) > 0.1  # unchanged entries: tau == 0
            model[name] = (base[name].float() + delta).to(kind)
        finetuned.append(model)
    merged = {name: (2 * base[name].float() - sum(f[name].float() for f in finetuned) / N).to(kind)
              if base[name].is_floating_point() else base[name] for name in base}
    paths = [root / "base", *(root / f"ft-{i:02d}" for i in range(N)), root / "merged"]
    for k, (path, tensors) in enumerate(zip(paths, [base, *finetuned, merged], strict=True)):
        _save(path, tensors, shards=3 if k == 2 else 1)
    return paths[0], paths[1:1 + N], paths[-1]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The references' many small torch ops run several times faster on one thread of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = write_models(tmp_path_factory.mktemp(f"inspect-{dtype}"), dtype)
        return cache[dtype]

    return get


# --- the float64 reference, on whole flattened tensors -------------------------------------------


def truncated(magnitude):
    """|tau| to 8 bits after the leading one, zero and subnormals as 0, by frexp."""
    mantissa, exponent = torch.frexp(magnitude)
    value = torch.ldexp(torch.floor(torch.ldexp(mantissa, torch.tensor(9))), exponent - 9)
    return torch.where(magnitude < 2.0**-1022, 0.0, value)


def reference_vectors(base_dir, finetuned_dirs, merged_dirs=()):
    """name -> (vectors x numel) float64 task vectors, the base tensor flattened, float only."""
    base = load_dir(base_dir)
    finetuned = [load_dir(d) for d in finetuned_dirs]
    merged = [load_dir(d) for d in merged_dirs]
    result = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        b = tensor.double().flatten()
        taus = [f[name].double().flatten() - b for f in finetuned]
        if len(taus) >= 2:
            taus.append(torch.stack(taus).mean(0))
        taus += [m[name].double().flatten() - b for m in merged]
        result[name] = (torch.stack(taus), b)
    return result


def reference_section(items, settings):
    """The statistics of a set of tensors [(taus, base)], concatenated like the original code."""
    taus = torch.cat([t for t, _ in items], dim=1)
    n = taus.shape[1]
    magnitude = taus.abs()
    rms = torch.cat([(t.pow(2).mean(1, keepdim=True)).sqrt().expand_as(t) for t, _ in items], dim=1)
    std = torch.cat([b.std(correction=0).expand_as(t) for t, b in items], dim=1)
    near_zero = magnitude < 2.0**-1022
    cut = truncated(magnitude)
    vectors = []
    for row in range(taus.shape[0]):
        x, a = taus[row], magnitude[row]
        vectors.append({
            "l1": a.sum().item(), "l2": torch.linalg.vector_norm(x).item(), "linf": a.max().item(),
            "lp": torch.linalg.vector_norm(x, ord=settings["p"]).item(), "min": x.min().item(), "max": x.max().item(),
            "mean": x.mean().item(), "rms": x.pow(2).mean().sqrt().item(), "zero_share": (x == 0).sum().item() / n,
            "below_abs": {f"{t:g}": ((a < t) | (x == 0)).sum().item() / n for t in settings["thresholds"]},
            "below_rms": {f"{c:g}": (near_zero[row] | (cut[row] < c * rms[row])).sum().item() / n
                          for c in settings["rms_fractions"]},
            "below_std": {f"{c:g}": (near_zero[row] | (cut[row] < c * std[row])).sum().item() / n
                          for c in settings["std_fractions"]},
        })
    normalised = torch.where(near_zero, 0.0, cut / rms)
    signs = taus.sign()
    return taus, magnitude, normalised, vectors, signs


def same(ours, expected):
    """A float64 statistic against the reference; None where the reference is undefined (NaN)."""
    return ours is None if math.isnan(expected) else ours == pytest.approx(expected, rel=1e-12)


def check_section(ours, items, names, n_finetuned, settings):
    taus, _, _, vectors, signs = reference_section(items, settings)
    n = taus.shape[1]
    assert ours["numel"] == n
    for name, expected in zip(names, vectors, strict=True):
        got = ours["vectors"][name]
        for key in ("l1", "l2", "linf", "lp", "rms"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=0), (name, key)  # no floor: norms are small
        for key in ("min", "max"):
            assert got[key] == expected[key], (name, key)  # exact: no arithmetic
        assert got["mean"] == pytest.approx(expected["mean"], rel=1e-10, abs=1e-12 * expected["l1"] / n), name
        for key in ("zero_share", "below_abs", "below_rms", "below_std"):
            assert got[key] == expected[key], (name, key)
    gram = taus @ taus.T
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms)
    assert np.allclose(np.array(ours["cross"]["cosine"], dtype=float), cosine.numpy(), rtol=1e-12, atol=1e-12,
                       equal_nan=True)
    agree = ((signs.unsqueeze(1) == signs.unsqueeze(0)) & (signs.unsqueeze(1) != 0)).sum(2).double() / n
    assert ours["cross"]["sign_agreement"] == agree.tolist()
    if n_finetuned >= 2:
        first = signs[:n_finetuned]
        all_agree = ((first == first[0]).all(0) & (first[0] != 0)).sum().item() / n
        assert ours["cross"]["all_agree"] == all_agree
        assert ours["cross"]["all_agree_by_chance"] == 2.0 ** (1 - n_finetuned)
        pairs = [cosine[i, j].item() for i in range(n_finetuned) for j in range(i + 1, n_finetuned)]
        assert same(ours["cross"]["mean_pairwise_cosine"], sum(pairs) / len(pairs))
        for i in range(n_finetuned):
            assert same(ours["cross"]["cosine_to_mean"][names[i]], cosine[i, n_finetuned].item())


def check_all(stats, reference, settings, n_finetuned):
    names = stats["vectors"]
    assert [t["name"] for t in stats["tensors"]] == list(reference)  # the integer buffer is skipped
    for record in stats["tensors"]:
        taus, base = reference[record["name"]]
        assert math.prod(record["shape"]) == taus.shape[1]
        assert record["base_std"] == pytest.approx(base.std(correction=0).item(), rel=1e-12, abs=1e-300)
        check_section(record, [(taus, base)], names, n_finetuned, settings)
    check_section(stats["global"], list(reference.values()), names, n_finetuned, settings)
    for group, section in stats["groups"].items():
        members = [value for name, value in reference.items() if group_of(name) == group]
        check_section(section, members, names, n_finetuned, settings)
    assert sum(s["numel"] for s in stats["groups"].values()) == stats["global"]["numel"]
    # histograms: numpy.histogram of the flattened |tau| (absolute) and of truncated |tau| / RMS
    _, magnitude, normalised, _, _ = reference_section(list(reference.values()), settings)
    for kind, values, top in (("absolute", magnitude, settings["range"]), ("normalised", normalised,
                                                                            settings["norm_range"])):
        histogram = stats["histograms"][kind]
        edges = (np.geomspace(top / 10 ** settings["log_decades"], top, settings["bins"] + 1)
                 if settings["log_bins"] else np.linspace(0, top, settings["bins"] + 1))
        assert histogram["edges"] == edges.tolist()
        for row, name in enumerate(names):
            counts, _ = np.histogram(values[row].numpy(), bins=edges)
            assert histogram["counts"][name] == counts.tolist(), (kind, name)
            assert histogram["below_range"][name] == int((values[row] < edges[0]).sum())
            assert histogram["above_range"][name] == int((values[row] > edges[-1]).sum())


DEFAULTS = {"p": 1.0, "thresholds": (1e-5, 1e-4, 1e-3), "rms_fractions": (0.01, 0.1),
            "std_fractions": (0.01, 0.1), "bins": 500, "range": 0.01, "norm_range": 5.0, "log_bins": False,
            "log_decades": 4.0}


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_statistic_matches_the_float64_reference(models, dtype):
    base, finetuned, merged = models(dtype)
    stats = inspect_checkpoints(base, finetuned, merged=[merged], progress=False)
    assert stats["vectors"] == ["ft-00", "ft-01", "ft-02", "mean", "merged"]
    assert {t["name"]: tuple(t["shape"]) for t in stats["tensors"]} == SHAPES
    check_all(stats, reference_vectors(base, finetuned, [merged]), DEFAULTS, N)
    assert any("integer" in note and "transformer.h.0.attn.step" in note for note in stats["notes"])


def test_other_settings_log_bins_and_p(models):
    base, finetuned, merged = models("float32")
    settings = DEFAULTS | {"p": 3.0, "thresholds": (3e-4,), "rms_fractions": (0.5, 2.0), "std_fractions": (0.3,),
                           "bins": 37, "range": 0.004, "norm_range": 3.0, "log_bins": True, "log_decades": 3.0}
    stats = inspect_checkpoints(base, finetuned[:2], merged=[merged], progress=False, **settings)
    check_all(stats, reference_vectors(base, finetuned[:2], [merged]), settings, 2)


def test_one_finetune_has_no_mean_and_no_agreement_summary(models):
    base, finetuned, _ = models("bfloat16")
    stats = inspect_checkpoints(base, finetuned[:1], progress=False)
    assert stats["vectors"] == ["ft-00"]
    assert "all_agree" not in stats["global"]["cross"]
    check_all(stats, reference_vectors(base, finetuned[:1]), DEFAULTS, 1)


@pytest.mark.parametrize("chunk_size", [52, 140, 1000])
def test_chunks_that_cut_tensors_anywhere_give_the_same_statistics(models, chunk_size):
    """Counts and histograms are identical; sums agree to float64 rounding (the order differs)."""
    base, finetuned, merged = models("float16")
    whole = inspect_checkpoints(base, finetuned, merged=[merged], progress=False)
    cut = inspect_checkpoints(base, finetuned, merged=[merged], progress=False, chunk_size=chunk_size)
    assert cut["histograms"] == whole["histograms"]
    for ours, theirs in zip([cut["global"], *cut["tensors"]], [whole["global"], *whole["tensors"]], strict=True):
        assert ours["cross"]["sign_agreement"] == theirs["cross"]["sign_agreement"]
        for name, values in ours["vectors"].items():
            for key, value in values.items():
                if isinstance(value, dict) or key in ("min", "max", "linf", "zero_share"):
                    assert value == theirs["vectors"][name][key], key
                else:
                    assert value == pytest.approx(theirs["vectors"][name][key], rel=1e-12, abs=1e-18), key
    check_all(cut, reference_vectors(base, finetuned, [merged]), DEFAULTS, N)


def test_mixed_dtypes_are_cast_on_read(models):
    """A bf16 base with float32 fine-tunes: the merge casts every chunk to float32, exactly."""
    base, _, _ = models("bfloat16")
    _, finetuned, _ = models("float32")
    stats = inspect_checkpoints(base, finetuned, progress=False)
    (note,) = [note for note in stats["notes"] if "differ in dtype" in note]
    assert note.endswith("each tensor is read as float32 (float64 where an input holds it so) and measured in float64")
    check_all(stats, reference_vectors(base, finetuned), DEFAULTS, N)


def test_synthetic_gpt2_sharded(synthetic_sets):
    sset = synthetic_sets("float32", sharded=True)
    stats = inspect_checkpoints(sset.base, sset.finetuned[:3], progress=False, chunk_size=30_000)
    check_all(stats, reference_vectors(sset.base, sset.finetuned[:3]), DEFAULTS, 3)
    assert set(stats["groups"]) == {"embeddings", "attention", "mlp", "norms"}


def test_cli_writes_the_report(models, tmp_path):
    base, finetuned, merged = models("float32")
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["inspect", "--base", str(base), *map(str, finetuned), "--merged", str(merged),
                                       "-o", str(out), "--bins", "40", "--range", "0.02"])
    assert result.exit_code == 0, result.output
    assert "mean pairwise cosine" in result.output and "merged" in result.output
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == ["cosine.png", "groups.png", "histogram_absolute.png",
                                                         "histogram_normalised.png"]
    rows = (out / "tensors.csv").read_text().splitlines()
    assert len(rows) == 1 + len(stats["tensors"]) * len(stats["vectors"])
    first = stats["tensors"][0]
    assert rows[1].split(",")[:6] == [first["name"], first["group"], str(first["numel"]), repr(first["base_std"]),
                                      "ft-00", repr(first["vectors"]["ft-00"]["l1"])]
    # the original get_task_vector_histogram's files: np.histogram(|M - B|, bins, range=(0, bin_max))
    whole = reference_vectors(base, [merged])
    magnitude = torch.cat([t[0] for t, _ in whole.values()]).abs().numpy()
    counts, edges = np.histogram(magnitude, bins=40, range=(0, 0.02))
    folder = out / "task_vector_histogram" / "merged"
    assert np.load(folder / "counts.npy").tolist() == counts.tolist()
    assert np.load(folder / "bin_edges.npy").tolist() == edges.tolist()
    # the original cal_task_vector_norm (p=1) and cal_task_vector_minmax, on the same vector
    flat = torch.cat([t[0] for t, _ in whole.values()])
    assert stats["global"]["vectors"]["merged"]["lp"] == pytest.approx(torch.norm(flat, p=1).item(), rel=1e-12)
    assert (stats["global"]["vectors"]["merged"]["min"], stats["global"]["vectors"]["merged"]["max"]) == \
        (flat.min().item(), flat.max().item())


def test_no_plot_and_overwrite(models, tmp_path):
    base, finetuned, _ = models("float32")
    out = tmp_path / "report"
    args = ["inspect", "--base", str(base), *map(str, finetuned), "-o", str(out), "--no-plot"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert not list(out.glob("*.png")) and (out / "stats.json").is_file()
    refused(tmp_path, *args, where=f"output {out} already exists; pass --overwrite")
    (out / "stale").write_text("x")
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert not (out / "stale").exists()


def test_bad_inputs_give_the_merge_errors(models, tmp_path):
    base, finetuned, _ = models("float32")
    tensors = load_dir(finetuned[0])
    missing = dict(tensors)
    del missing["transformer.h.0.mlp.c_fc.weight"]
    _save(tmp_path / "missing", missing)
    wrong = dict(tensors) | {"transformer.ln_f.weight": torch.zeros(12)}
    _save(tmp_path / "wrong", wrong)
    out = tmp_path / "out"
    line = refused(tmp_path, "inspect", "--base", base, finetuned[1], tmp_path / "missing", "-o", out,
                   where=f"{tmp_path / 'missing'}")
    assert "tensor 'transformer.h.0.mlp.c_fc.weight' is missing" in line
    line = refused(tmp_path, "inspect", "--base", base, tmp_path / "wrong", "-o", out, where=f"{tmp_path / 'wrong'}")
    assert f"tensor 'transformer.ln_f.weight' has shape [12], but {base / 'model.safetensors'} has [11]" in line
    refused(tmp_path, "inspect", "--base", base, finetuned[0], finetuned[0], "-o", out,
            where=f"{finetuned[0]} is given twice")
    refused(tmp_path, "inspect", "--base", base, tmp_path / "nowhere", "-o", out,
            where=f"{tmp_path / 'nowhere'}: no such file or directory")
    refused(tmp_path, "inspect", "--base", base, "-o", out, where="nothing to inspect")
    refused(tmp_path, "inspect", "--base", base, finetuned[0], "-o", out, "--range", "0", where="--range must be")
    assert not out.exists()


# Floating tensors of layer 0 and the ends, as transformers' tiny models of each architecture name them
# (tests/tiny_models.py), listed here so the test does not import transformers.
ARCHITECTURE_NAMES = {
    'gpt2': [
        'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.ln_1.weight',
        'transformer.h.0.ln_1.bias', 'transformer.h.0.attn.c_attn.weight', 'transformer.h.0.attn.c_attn.bias',
        'transformer.h.0.attn.c_proj.weight', 'transformer.h.0.attn.c_proj.bias', 'transformer.h.0.ln_2.weight',
        'transformer.h.0.ln_2.bias', 'transformer.h.0.mlp.c_fc.weight', 'transformer.h.0.mlp.c_fc.bias',
        'transformer.h.0.mlp.c_proj.weight', 'transformer.h.0.mlp.c_proj.bias', 'transformer.ln_f.weight',
        'transformer.ln_f.bias', 'lm_head.weight',
    ],
    'llama': [
        'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
        'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight',
        'model.layers.0.self_attn.o_proj.weight', 'model.layers.0.mlp.gate_proj.weight',
        'model.layers.0.mlp.up_proj.weight', 'model.layers.0.mlp.down_proj.weight',
        'model.layers.0.input_layernorm.weight', 'model.layers.0.post_attention_layernorm.weight',
        'model.norm.weight', 'lm_head.weight',
    ],
    'mistral': [
        'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
        'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight',
        'model.layers.0.self_attn.o_proj.weight', 'model.layers.0.mlp.gate_proj.weight',
        'model.layers.0.mlp.up_proj.weight', 'model.layers.0.mlp.down_proj.weight',
        'model.layers.0.input_layernorm.weight', 'model.layers.0.post_attention_layernorm.weight',
        'model.norm.weight', 'lm_head.weight',
    ],
    'qwen2': [
        'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
        'model.layers.0.self_attn.q_proj.bias', 'model.layers.0.self_attn.k_proj.weight',
        'model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.v_proj.weight',
        'model.layers.0.self_attn.v_proj.bias', 'model.layers.0.self_attn.o_proj.weight',
        'model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.up_proj.weight',
        'model.layers.0.mlp.down_proj.weight', 'model.layers.0.input_layernorm.weight',
        'model.layers.0.post_attention_layernorm.weight', 'model.norm.weight', 'lm_head.weight',
    ],
    'gemma': [
        'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
        'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight',
        'model.layers.0.self_attn.o_proj.weight', 'model.layers.0.mlp.gate_proj.weight',
        'model.layers.0.mlp.up_proj.weight', 'model.layers.0.mlp.down_proj.weight',
        'model.layers.0.input_layernorm.weight', 'model.layers.0.post_attention_layernorm.weight',
        'model.norm.weight', 'lm_head.weight',
    ],
    'phi': [
        'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
        'model.layers.0.self_attn.q_proj.bias', 'model.layers.0.self_attn.k_proj.weight',
        'model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.v_proj.weight',
        'model.layers.0.self_attn.v_proj.bias', 'model.layers.0.self_attn.dense.weight',
        'model.layers.0.self_attn.dense.bias', 'model.layers.0.mlp.fc1.weight', 'model.layers.0.mlp.fc1.bias',
        'model.layers.0.mlp.fc2.weight', 'model.layers.0.mlp.fc2.bias', 'model.layers.0.input_layernorm.weight',
        'model.layers.0.input_layernorm.bias', 'model.final_layernorm.weight', 'model.final_layernorm.bias',
        'lm_head.weight', 'lm_head.bias',
    ],
    'gpt_neox': [
        'gpt_neox.embed_in.weight', 'gpt_neox.layers.0.input_layernorm.weight',
        'gpt_neox.layers.0.input_layernorm.bias', 'gpt_neox.layers.0.post_attention_layernorm.weight',
        'gpt_neox.layers.0.post_attention_layernorm.bias', 'gpt_neox.layers.0.attention.query_key_value.weight',
        'gpt_neox.layers.0.attention.query_key_value.bias', 'gpt_neox.layers.0.attention.dense.weight',
        'gpt_neox.layers.0.attention.dense.bias', 'gpt_neox.layers.0.mlp.dense_h_to_4h.weight',
        'gpt_neox.layers.0.mlp.dense_h_to_4h.bias', 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight',
        'gpt_neox.layers.0.mlp.dense_4h_to_h.bias', 'gpt_neox.final_layer_norm.weight',
        'gpt_neox.final_layer_norm.bias', 'lm_head.weight',
    ],
    'opt': [
        'model.decoder.embed_tokens.weight', 'model.decoder.embed_positions.weight',
        'model.decoder.final_layer_norm.weight', 'model.decoder.final_layer_norm.bias',
        'model.decoder.layers.0.self_attn.k_proj.weight', 'model.decoder.layers.0.self_attn.k_proj.bias',
        'model.decoder.layers.0.self_attn.v_proj.weight', 'model.decoder.layers.0.self_attn.v_proj.bias',
        'model.decoder.layers.0.self_attn.q_proj.weight', 'model.decoder.layers.0.self_attn.q_proj.bias',
        'model.decoder.layers.0.self_attn.out_proj.weight', 'model.decoder.layers.0.self_attn.out_proj.bias',
        'model.decoder.layers.0.self_attn_layer_norm.weight', 'model.decoder.layers.0.self_attn_layer_norm.bias',
        'model.decoder.layers.0.fc1.weight', 'model.decoder.layers.0.fc1.bias', 'model.decoder.layers.0.fc2.weight',
        'model.decoder.layers.0.fc2.bias', 'model.decoder.layers.0.final_layer_norm.weight',
        'model.decoder.layers.0.final_layer_norm.bias', 'lm_head.weight',
    ],
}


@pytest.mark.parametrize("kind", sorted(ARCHITECTURE_NAMES))
def test_every_tensor_of_common_architectures_has_a_group(kind):
    groups = {name: group_of(name) for name in ARCHITECTURE_NAMES[kind]}
    assert {"embeddings", "attention", "mlp", "norms", "head"} == set(groups.values()), groups
    for name, group in groups.items():
        assert ("norm" in name or "ln_" in name) == (group == "norms"), name
        assert name.startswith("lm_head.") == (group == "head"), name
        assert ("embed" in name or name.split(".")[-2] in ("wte", "wpe")) == (group == "embeddings"), name
    assert group_of("gpt_neox.embed_out.weight") == "head"
    assert group_of("score.weight") == "other"


def test_an_unchanged_model_is_all_near_zero_with_undefined_cosines(models, tmp_path):
    """tau == 0: every entry is near zero at every threshold (also c * RMS, which is 0), its
    cosines are undefined (None in stats.json) and it agrees in sign with nothing."""
    base, finetuned, _ = models("float32")
    shutil.copytree(base, tmp_path / "copy")
    stats = inspect_checkpoints(base, [tmp_path / "copy", finetuned[0]], progress=False)
    zero = stats["global"]["vectors"]["copy"]
    assert (zero["l1"], zero["l2"], zero["linf"], zero["zero_share"]) == (0.0, 0.0, 0.0, 1.0)
    assert all(share == 1.0 for kind in ("below_abs", "below_rms", "below_std") for share in zero[kind].values())
    cross = stats["global"]["cross"]
    assert cross["cosine"][0] == [None, None, None] and cross["cosine"][1][1] == pytest.approx(1.0)
    assert cross["sign_agreement"][0] == [0.0, 0.0, 0.0] and cross["all_agree"] == 0.0
    assert cross["cosine_to_mean"] == {"copy": None, "ft-00": pytest.approx(1.0)}
    normalised = stats["histograms"]["normalised"]["counts"]["copy"]
    assert normalised[0] == stats["global"]["numel"] and sum(normalised) == normalised[0]


@pytest.mark.parametrize("log", [False, True])
def test_histogram_slots_follow_numpy_at_every_edge(log):
    """Values exactly on each edge, just below and above it, outside the range, inf and NaN."""
    from taskvec.inspect.accumulators import Binning

    edges = np.geomspace(1e-6, 0.01, 301) if log else np.linspace(0, 0.01, 301)
    values = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1), [0.0, 0.5, np.inf, np.nan],
                             np.random.default_rng(0).uniform(0, 0.012, 5000)])
    slots = Binning(edges, log, torch.device("cpu")).slots(torch.tensor(values))
    counts = torch.bincount(slots, minlength=302).tolist()
    inside = (values >= edges[0]) & (values <= edges[-1])
    assert counts[1:-1] == np.histogram(values[inside], bins=edges)[0].tolist()
    assert counts[0] == int((values < edges[0]).sum()) and counts[-1] == len(values) - inside.sum() - counts[0]


@pytest.mark.parametrize("engine", ["fused", "torch"])
def test_nan_and_infinite_entries_count_below_nothing_and_are_noted(tmp_path, monkeypatch, engine):
    """A NaN entry makes its tensor's RMS NaN: no entry is below c * NaN (|tau| < NaN is false),
    where counting from the grid once put every entry there. An infinite one makes the RMS
    infinite: every finite entry is below c * inf. A NaN in the base makes its std NaN: nothing
    below c * std. Each such vector is named in a note, with its tensors."""
    import taskvec.inspect.stream as stream

    monkeypatch.setattr(stream, "CPU_ENGINE", engine)
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight"]
    base = {name: torch.zeros(8) for name in names}
    base["transformer.ln_f.weight"] = torch.tensor([1.0, 1.0, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0])
    finetuned = {names[0]: torch.tensor([0.5, -0.3, 0.0, 0.9, -0.7, 0.1, 0.4, math.nan]),
                 names[1]: torch.tensor([0.5, -0.3, 0.0, 0.9, -0.7, 0.1, -math.inf, 1e-9]),
                 names[2]: torch.tensor([1.5, 1.0, 0.0, 1.1, 1.0, 1.0, 1.0, 1.2])}
    _save(tmp_path / "base", base)
    _save(tmp_path / "ft", finetuned)
    stats = inspect_checkpoints(tmp_path / "base", [tmp_path / "ft"], progress=False, rms_fractions=(0.01, 0.1))
    tensors = {record["name"]: record["vectors"]["ft"] for record in stats["tensors"]}
    assert math.isnan(tensors[names[0]]["rms"]) and tensors[names[0]]["below_rms"] == {"0.01": 0.0, "0.1": 0.0}
    assert tensors[names[1]]["rms"] == math.inf and tensors[names[1]]["below_rms"] == {"0.01": 7 / 8, "0.1": 7 / 8}
    assert tensors[names[2]]["below_std"] == {"0.01": 0.0, "0.1": 0.0}  # the base's std is NaN
    assert tensors[names[2]]["below_abs"]["0.001"] == 4 / 8  # tau: 0.5, 0, NaN, 0.1, 0, 0, 0, 0.2
    assert stats["notes"] == [f"ft: NaN or infinite entries in 3 tensors ({', '.join(names)}): norms and RMS over "
                              "them are NaN or infinite, and shares relative to the RMS mean nothing there"]


@pytest.mark.parametrize(("options", "message"), [
    (["--range", "1e-310", "--bins", "13"], "--range 1e-310 in 13 bins (linear): bins too narrow for float64"),
    (["--range", "1e-306"], "--range 1e-306 in 500 bins (linear): bins too narrow"),
    (["--norm-range", "1e-320"], "--norm-range 9.99989e-321 in 500 bins (linear)"),
    (["--log-bins", "--log-decades", "400"], "--range 0.01 in 500 bins (log-spaced over 400 decades)"),
    (["--log-bins", "--log-decades", "1e-17"], "--range 0.01 in 500 bins (log-spaced over 1e-17 decades)"),
])
def test_bins_too_narrow_for_float64_are_refused(models, tmp_path, options, message):
    """Edges in the subnormal range (the slot arithmetic overflows there, and the grid counts
    subnormal |tau| as 0), edges that coincide, and a decade count whose power overflows: one
    error line, before anything is read."""
    base, finetuned, _ = models("float32")
    refused(tmp_path, "inspect", "--base", base, finetuned[0], "-o", tmp_path / "out", *options, where=message)


def test_stats_json_is_strict_json_with_null_for_nan_and_infinities(tmp_path):
    """Python's json writes bare NaN and Infinity, which jq and JavaScript refuse."""
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]
    _save(tmp_path / "base", {name: torch.zeros(4) for name in names})
    _save(tmp_path / "ft", {names[0]: torch.tensor([0.5, math.nan, 0.0, 0.1]), names[1]: torch.tensor([0.1] * 4)})
    returned = inspect_checkpoints(tmp_path / "base", [tmp_path / "ft"], output=tmp_path / "out", plot=False,
                                   progress=False)

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    written = json.loads((tmp_path / "out" / "stats.json").read_text(), parse_constant=refuse)
    nan_tensor, finite_tensor = written["tensors"]
    assert nan_tensor["vectors"]["ft"]["l2"] is None and math.isnan(returned["tensors"][0]["vectors"]["ft"]["l2"])
    assert finite_tensor["vectors"]["ft"] == returned["tensors"][1]["vectors"]["ft"]  # finite numbers as they are


def test_vector_names_that_collide_keep_every_histogram_and_the_mean_its_name(tmp_path):
    """a/ft and b/ft are ft#1 and ft#2, whose histogram folder ft_1 a directory named ft_1 also
    wanted (one histogram overwrote the other); a fine-tune named `mean` took the mean's name."""
    from taskvec.inspect.report import histogram_folders

    name = "transformer.h.0.attn.c_attn.weight"
    _save(tmp_path / "base", {name: torch.zeros(20)})
    dirs = []
    for k, where in enumerate(["a/ft", "b/ft", "ft_1", "mean"]):
        _save(tmp_path / where, {name: torch.full((20,), 10.0 ** -(k + 2))})
        dirs.append(tmp_path / where)
    stats = inspect_checkpoints(tmp_path / "base", dirs, output=tmp_path / "out", plot=False, progress=False)
    assert stats["vectors"] == ["ft#1", "ft#2", "ft_1", "mean#1", "mean"]
    assert stats["global"]["vectors"]["mean"]["max"] == pytest.approx(np.mean([1e-2, 1e-3, 1e-4, 1e-5]), rel=1e-6)
    folders = histogram_folders(stats["vectors"])
    assert folders == ["ft_1-2", "ft_2", "ft_1", "mean_1", "mean"]
    for vector, folder in zip(stats["vectors"], folders, strict=True):
        saved = np.load(tmp_path / "out" / "task_vector_histogram" / folder / "counts.npy")
        assert saved.tolist() == stats["histograms"]["absolute"]["counts"][vector], vector


def test_empty_option_lists_and_models_with_no_entries_are_refused_and_empty_tensors_noted(models, tmp_path):
    """An empty --thresholds list broke the terminal table after the report was written; a model
    whose floating tensors have no elements raised an IndexError; empty tensors vanished silently."""
    base, finetuned, _ = models("float32")
    for option in ("--thresholds", "--rms-fractions", "--std-fractions"):
        refused(tmp_path, "inspect", "--base", base, finetuned[0], "-o", tmp_path / "out", option, ",",
                where=f"{option} must be one or more positive finite numbers, got []")
    for where in ("ebase", "eft"):
        _save(tmp_path / where, {"transformer.wte.weight": torch.zeros(0, 4), "transformer.h.0.attn.mask": torch.ones(3,
              dtype=torch.int64)})
    refused(tmp_path, "inspect", "--base", tmp_path / "ebase", tmp_path / "eft", "-o", tmp_path / "out",
            where=f"{tmp_path / 'ebase'}: no floating-point entries to inspect")
    tensors = load_dir(base)
    for where, source in (("base2", base), ("ft2", finetuned[0])):
        _save(tmp_path / where, load_dir(source) | {"transformer.h.0.attn.empty": torch.zeros(0)})
    stats = inspect_checkpoints(tmp_path / "base2", [tmp_path / "ft2"], progress=False)
    assert "1 empty tensors skipped (transformer.h.0.attn.empty)" in stats["notes"]
    assert stats["global"]["numel"] == sum(t.numel() for t in tensors.values() if t.is_floating_point())


@pytest.mark.parametrize("engine", ["fused", "torch"])
def test_the_base_spread_of_a_layernorm_near_one_holds_to_float64_at_any_chunk_size(tmp_path, monkeypatch, engine):
    """A float32 weight of 1 + 1e-7 noise: slices' means combined at the values' scale kept only
    1e-9 of the spread (8e-11 relative error in its std at small chunks); about the tensor's first
    value they hold to float64 rounding."""
    import taskvec.inspect.stream as stream

    monkeypatch.setattr(stream, "CPU_ENGINE", engine)
    weight = 1.0 + 1e-7 * torch.randn(4099, generator=torch.Generator().manual_seed(0))
    _save(tmp_path / "base", {"transformer.h.0.ln_1.weight": weight})
    _save(tmp_path / "ft", {"transformer.h.0.ln_1.weight": weight + 1e-4})
    expected = float(np.std(weight.double().numpy()))
    for chunk_size in ("4MiB", 64, 256, 1236, 4000):
        stats = inspect_checkpoints(tmp_path / "base", [tmp_path / "ft"], chunk_size=chunk_size, progress=False)
        assert stats["tensors"][0]["base_std"] == pytest.approx(expected, rel=1e-12, abs=0), chunk_size
