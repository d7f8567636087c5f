"""The harness's own checks: the measurement sees a child's memory, the checker rejects wrong merges."""

from __future__ import annotations

import sys

import pytest

from benchmarks.book import Book, Row
from benchmarks.check import check_negated_mean
from benchmarks.measure import measure
from benchmarks.tools import command, ensure_checkpoints, unavailable


def test_measure_reports_the_child_peak_not_the_parent():
    small = measure([sys.executable, "-c", "pass"])
    big = measure([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert big.max_rss_bytes - small.max_rss_bytes > 280 * 2**20
    assert small.wall_s > 0


def test_measure_raises_with_the_child_stderr():
    with pytest.raises(RuntimeError, match="boom"):
        measure([sys.executable, "-c", "import sys; sys.exit('boom')"])


def test_check_rejects_a_merge_with_the_wrong_scale(tmp_path):
    reason = unavailable("taskvec")
    if reason:
        pytest.skip(reason)
    inputs = ensure_checkpoints(tmp_path, "tiny", "float32", 2)
    output = tmp_path / "out"
    measure(command("taskvec", inputs, 0.5, output, tmp_path))
    assert check_negated_mean(output, inputs.base, inputs.finetuned, 0.5).worst_error_over_bound <= 1
    with pytest.raises(AssertionError, match="off the float64 reference"):
        check_negated_mean(output, inputs.base, inputs.finetuned, 0.6)
    with pytest.raises(AssertionError, match="off the float64 reference"):
        check_negated_mean(output, inputs.base, inputs.finetuned[:1], 0.5)


def test_book_relates_the_gpu_merge_to_reading_the_inputs():
    book = Book("full")
    case = "gpt2-float32-N5"
    read_write = Row(case, "read+write", walls_s=[3.0], extra={"read_s": 2.0, "write_s": 1.0})
    for row in (Row(case, "import taskvec", walls_s=[0.5]), read_write,
                Row(case, "taskvec", walls_s=[6.0, 5.0, 7.0], rss_bytes=[300 * 2**20]),
                Row(case, "taskvec-cuda", walls_s=[2.5, 2.4, 3.0])):
        book.add(row)
    summary = book.case_summary(case)
    assert summary["cuda_read_ratio"] == pytest.approx(2.5 / 2.0)
    assert summary["cuda_speedup"] == pytest.approx(6.0 / 2.5)
    assert summary["floor_ratio"] == pytest.approx(6.0 / 3.5)
    assert "| gpt2-float32-N5 | 2.50 | 1.25x | 2.40x |" in book.markdown()
    assert "cuda_read_ratio" not in Book("full").case_summary(case)


def _lora_output(inputs, scale: float, transpose: bool) -> dict:
    """base - scale * mean_i(delta_i) in float64 from the adapter files, cast to float32."""
    import json

    from safetensors.torch import load_file

    out = {name: t.double() for name, t in load_file(inputs.base / "model.safetensors").items()}
    n = len(inputs.finetuned)
    for adapter in inputs.finetuned:
        alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
        factors = load_file(adapter / "adapter_model.safetensors")
        for key, a in factors.items():
            if key.endswith(".lora_A.weight"):
                b = factors[key.replace(".lora_A.", ".lora_B.")].double()
                delta = b @ a.double() * alpha / a.shape[0]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                out[name] -= scale / n * (delta.T if transpose else delta.reshape(out[name].shape))
    return {name: t.float() for name, t in out.items()}


def test_check_computes_lora_fine_tunes_as_transposed_b_a(tmp_path):
    from safetensors.torch import save_file

    inputs = ensure_checkpoints(tmp_path, "tiny", "float32", 2, "lora")
    output = tmp_path / "out"
    output.mkdir()
    save_file(_lora_output(inputs, 0.5, transpose=True), output / "model.safetensors")
    assert check_negated_mean(output, inputs.base, inputs.finetuned, 0.5).worst_error_over_bound <= 1
    for wrong in (_lora_output(inputs, 0.5, transpose=False), _lora_output(inputs, 0.0, transpose=True)):
        save_file(wrong, output / "model.safetensors")
        with pytest.raises(AssertionError, match="off the float64 reference"):
            check_negated_mean(output, inputs.base, inputs.finetuned, 0.5)


def test_bin_set_holds_the_safetensors_values(tmp_path):
    import torch
    from safetensors.torch import load_file

    inputs = ensure_checkpoints(tmp_path, "tiny", "float32", 1, "bin")
    for model in inputs.directories:
        loaded = torch.load(model / "pytorch_model.bin", weights_only=True)
        stored = load_file(tmp_path / "tiny-float32" / model.name / "model.safetensors")
        assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], stored[k]) for k in stored)
        assert (model / "config.json").exists() and not list(model.glob("*.safetensors"))


def test_book_relates_bin_and_lora_rows_to_the_safetensors_merge():
    book = Book("full")
    case = "gpt2-float32-N5"
    book.add(Row(case, "import taskvec", walls_s=[1.0]))
    book.add(Row(case, "taskvec", walls_s=[2.0], rss_bytes=[300 * 2**20]))
    book.add(Row(case + "-bin", "read+write", walls_s=[1.0], extra={"read_s": 0.5, "write_s": 0.5}))
    book.add(Row(case + "-bin", "taskvec", walls_s=[3.0], rss_bytes=[450 * 2**20]))
    book.add(Row(case + "-lora", "taskvec", walls_s=[4.0], rss_bytes=[330 * 2**20]))
    summary = book.case_summary(case + "-bin")
    assert summary["vs_safetensors_time"] == pytest.approx(1.5)
    assert summary["vs_safetensors_rss"] == pytest.approx(1.5)
    assert summary["floor_ratio"] == pytest.approx(3.0 / 2.0)  # the import measured once, in the safetensors case
    assert "| gpt2-float32-N5-lora | gpt2-float32-N5 | 4.00 | 2.00 | 2.00x | 330 | 300 | 1.10x |" in book.markdown()
    assert "vs_safetensors_time" not in book.case_summary(case)
