"""The compiled CPU pass (taskvec.inspect.fused) against the torch accumulators, and its pieces.

Both engines read the same chunks; every count and histogram must be identical, sums agree to
float64 rounding (the compiled loop adds in another order: relative 1e-12 is far above rounding
over a few thousand entries and far below any real error). The inputs hold what the fast paths
special-case: entries exactly on histogram edges and thresholds and one float step either side,
zeros of both signs, subnormal task vectors (float64 inputs), NaN and infinities, and more
vectors than the torch path's sign codes take (it compares signs directly there).
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_inspect import check_all, reference_vectors

from taskvec.inspect import fused, inspect_checkpoints, loops, stream
from taskvec.inspect.accumulators import Binning
from taskvec.inspect.fused import CellBins
from taskvec.inspect.settings import Settings

EDGES = np.linspace(0.0, 0.01, 501)
SPECIAL = [np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, -2.5e-310, 1e-5, 1e-4, 1e-3, 0.01, 0.02, 0.5, 3.0,
           *np.array([0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001], dtype=np.int64).view(np.float64)]  # NaN payloads


def _exact_values() -> np.ndarray:
    """Task-vector entries on and next to every edge and threshold, and the special values."""
    marks = np.concatenate([EDGES, [1e-5, 1e-4, 1e-3, 3e-4], np.geomspace(0.004 / 1e3, 0.004, 38)])
    values = np.concatenate([marks, np.nextafter(marks, 0), np.nextafter(marks, 1), SPECIAL])
    return np.concatenate([values, -values])


def write_models(root, dtype: torch.dtype, n: int, exact: bool):
    """A base and n fine-tunes; with `exact` (float64), fine-tune 1 holds the exact values over a
    zero base and fine-tune 0 NaN and infinities elsewhere."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"transformer.wte.weight": (29, 13), "transformer.h.0.ln_1.weight": (13,),
              "transformer.h.0.mlp.c_fc.weight": (13, 17), "transformer.h.0.attn.c_attn.bias": (39,)}
    base = {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for name, shape in shapes.items()}
    models = []
    for k in range(n):
        model = {}
        for name, shape in shapes.items():
            delta = torch.randn(shape, generator=generator) * 10.0 ** -(2 + k % 3)
            delta *= torch.rand(shape, generator=generator) > 0.2
            model[name] = (base[name].double() + delta.double()).to(dtype)
        models.append(model)
    if exact:
        values = torch.from_numpy(_exact_values())
        base["transformer.exact.weight"] = torch.zeros(values.numel(), dtype=dtype)
        for k, model in enumerate(models):
            model["transformer.exact.weight"] = values.to(dtype) if k == 1 else torch.zeros(values.numel(), dtype=dtype)
        models[0]["transformer.h.0.attn.c_attn.bias"][:4] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    paths = [root / "base", *(root / f"ft-{k:02d}" for k in range(n))]
    for path, tensors in zip(paths, [base, *models], strict=True):
        path.mkdir()
        save_file({name: t.contiguous() for name, t in tensors.items()}, path / "model.safetensors")
    return paths[0], paths[1:]


def same(fused_value, torch_value, where=""):
    """Counts and structure identical; floats to float64 rounding; NaN where the other is NaN."""
    if isinstance(torch_value, dict):
        assert fused_value.keys() == torch_value.keys(), where
        for key in torch_value:
            same(fused_value[key], torch_value[key], f"{where}/{key}")
    elif isinstance(torch_value, list):
        assert len(fused_value) == len(torch_value), where
        for k, (ours, theirs) in enumerate(zip(fused_value, torch_value, strict=True)):
            same(ours, theirs, f"{where}[{k}]")
    elif isinstance(torch_value, float) and not isinstance(fused_value, int):
        if math.isnan(torch_value):
            assert math.isnan(fused_value), where
        else:
            assert fused_value == pytest.approx(torch_value, rel=1e-12, abs=1e-300), where
    else:
        assert fused_value == torch_value, where


def both_engines(monkeypatch, *args, **kwargs) -> tuple[dict, dict]:
    monkeypatch.setattr(fused, "PARALLEL_MIN", 7)  # several blocks even on these small tensors
    ours = inspect_checkpoints(*args, progress=False, **kwargs)
    monkeypatch.setattr(stream, "CPU_ENGINE", "torch")
    theirs = inspect_checkpoints(*args, progress=False, **kwargs)
    monkeypatch.setattr(stream, "CPU_ENGINE", "fused")
    return ours, theirs


@pytest.mark.parametrize("chunk_size", [100, 4096, "4MiB"])
@pytest.mark.parametrize(("log_bins", "bins"), [(False, 500), (True, 37), (False, 1500)])
def test_fused_equals_torch_on_edges_specials_and_subnormals(tmp_path, monkeypatch, chunk_size, log_bins, bins):
    """Also with 1500 bins, where some grid cells hold two edges and their entries are binned
    one by one."""
    base, finetuned = write_models(tmp_path, torch.float64, 3, exact=True)
    settings = {"log_bins": log_bins, "range": 0.004 if log_bins else 0.01, "bins": bins,
                "log_decades": 3.0, "p": 3.0 if log_bins else 1.0, "thresholds": (1e-5, 1e-4, 3e-4, 1e-3)}
    ours, theirs = both_engines(monkeypatch, base, finetuned[:2], merged=finetuned[2:], chunk_size=chunk_size,
                                **settings)
    same(ours, theirs)
    exact = next(t for t in ours["tensors"] if t["name"] == "transformer.exact.weight")
    assert 0 < exact["vectors"]["ft-01"]["below_abs"]["0.001"] < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_torch_and_the_reference_for_each_dtype(tmp_path, monkeypatch, dtype):
    base, finetuned = write_models(tmp_path, dtype, 3, exact=False)
    ours, theirs = both_engines(monkeypatch, base, finetuned, chunk_size=300)
    same(ours, theirs)
    defaults = {"p": 1.0, "thresholds": (1e-5, 1e-4, 1e-3), "rms_fractions": (0.01, 0.1),
                "std_fractions": (0.01, 0.1), "bins": 500, "range": 0.01, "norm_range": 5.0, "log_bins": False,
                "log_decades": 4.0}
    check_all(theirs, reference_vectors(base, finetuned), defaults, 3)  # the torch path is a reference too
    check_all(ours, reference_vectors(base, finetuned), defaults, 3)


@pytest.mark.parametrize("n", [1, 12])
def test_fused_equals_torch_for_one_and_many_vectors(tmp_path, monkeypatch, n):
    """One fine-tune (no mean, no all-agree), and 12 + the mean: beyond the torch sign codes."""
    base, finetuned = write_models(tmp_path, torch.float32, n, exact=False)
    ours, theirs = both_engines(monkeypatch, base, finetuned, chunk_size=2000)
    same(ours, theirs)
    assert len(ours["vectors"]) == n + (n >= 2)


def test_grid_counts_moved_to_int64_before_int32_could_overflow(tmp_path, monkeypatch):
    """The grid counts in int32 and moves its counts to int64 every GRID_LIMIT entries of a
    tensor: with a limit of 50 the moves happen within most tensors, and nothing changes."""
    base, finetuned = write_models(tmp_path, torch.float64, 3, exact=True)
    monkeypatch.setattr(fused, "GRID_LIMIT", 50)
    moved, theirs = both_engines(monkeypatch, base, finetuned, chunk_size=100)
    same(moved, theirs)
    monkeypatch.setattr(fused, "GRID_LIMIT", 2**31 - 1)
    unmoved = inspect_checkpoints(base, finetuned, progress=False, chunk_size=100)
    assert json.dumps(moved, sort_keys=True) == json.dumps(unmoved, sort_keys=True)  # NaN included


@pytest.mark.parametrize(("log_bins", "bins"), [(False, 61), (True, 61), (False, 1500)])
def test_a_cells_halves_hold_the_slots_of_its_values(log_bins, bins):
    """Every value of a cell lies in its first slot up to `above` and in the next beyond it (as
    integer bits), as numpy.histogram bins it, unless the cell is marked for binning entry by
    entry: checked on values at, and one step either side of, every edge, on random values, and
    on NaNs with every payload bit set (the largest bits there are); with 1500 bins some cells
    hold two edges (marked), with 61 none does."""
    settings = Settings(log_bins=log_bins, bins=bins, range=0.003)
    edges = settings.edges(settings.range)
    binning = Binning(edges, log_bins, torch.device("cpu"))
    cells = CellBins(binning)
    rng = np.random.default_rng(0)
    values = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1), 10.0 ** rng.uniform(-9, 0, 20000),
                             [0.0, 5e-324, 2.2e-308, np.inf, np.nan],
                             np.array([0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001], dtype=np.int64).view(np.float64)])
    bits = values.view(np.int64)
    keys = bits >> 44
    expected = binning.slots(torch.from_numpy(values)).numpy()
    whole = ~cells.multi[keys]
    upper = bits > cells.above[keys]
    slots = cells.first[keys] + upper
    assert (slots[whole] == expected[whole]).all()
    assert cells.multi.any() == (bins > 512)
    assert (cells.multi == (cells.above < 0)).all()
    split = (cells.above >= 0)[keys] & (cells.above < np.iinfo(np.int64).max)[keys]
    assert (split & upper).sum() > 100 and (split & ~upper).sum() > 100  # both halves of cut cells are reached
    assert whole.all() if bins <= 512 else 0.5 < whole.mean() < 1  # most values are binned by cell


def test_the_warm_up_loads_the_very_loop_the_pass_runs(tmp_path):
    """inspect_checkpoints loads the compiled loops on a thread while it imports and plans; that is
    only worth it if the pass then finds the same compiled signatures (float32 and float64 rows
    alike, the tensors' closing too, an integer p from the Python API), not a second one to load."""
    loops.warm_up()
    compiled = (loops.accumulate, loops.close_cells)
    warmed = [set(loop.signatures) for loop in compiled]
    assert len(loops.accumulate.signatures) == 1
    for dtype in (torch.float32, torch.float64):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        base, finetuned = write_models(folder, dtype, 2, exact=False)
        inspect_checkpoints(base, finetuned, progress=False)
        inspect_checkpoints(base, finetuned, progress=False, p=3)
    assert [set(loop.signatures) for loop in compiled] == warmed


def test_a_command_failing_beside_the_warm_up_exits_cleanly(tmp_path):
    """An error raised while the compiled loops still load (a missing fine-tune, found after the
    warm-up starts): the script catches it and ends normally. The interpreter must wait for the
    loading rather than finalize around it, which aborted such a process about one time in three
    (status 134, "terminate called without an active exception"). Settings are refused before
    any loading starts. torch is imported first, so that the error comes before the loading ends."""
    base, _ = write_models(tmp_path, torch.float32, 1, exact=False)
    script = f"""
import threading
import torch
from taskvec.errors import TaskvecError
from taskvec.inspect import inspect_checkpoints
try:
    inspect_checkpoints({str(base)!r}, bins=0)
except TaskvecError:
    assert [t.name for t in threading.enumerate()] == ["MainThread"]
try:
    inspect_checkpoints({str(base)!r}, [{str(tmp_path / "nowhere")!r}], progress=False)
except TaskvecError as err:
    assert "nowhere" in str(err)
    assert "taskvec-inspect-warm-up" in [t.name for t in threading.enumerate()]
"""
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr) == (0, "")

