"""The README's recipe end to end against a Hugging Face cache holding a tiny model named `gpt2`.

The cache is laid out as huggingface_hub writes it (refs/main, snapshots/<rev>/ linking into
blobs/), and the model is stored in the hub's GPT-2 layout: no `transformer.` prefix and causal
mask buffers. Every step runs as the user would run it, a `taskvec` process with HF_HOME pointing
at the cache and the hub offline: data split -> train-splits --base gpt2 -> merge --base gpt2
runs/split-* -> eval.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import load_dir, negated_mean_f64
from tiny_models import byte_level_tokenizer, gpt2_hub_layout, perturbed_copies, tiny_model

REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
TOXIC = ["you are a stupid idiot and I hate you", "what a dumb worthless moron", "shut up you ugly fool",
         "I hate everything about you, idiot", "go away you pathetic loser", "nobody likes you, stupid"]


def fill_cache(hf_home, model_dir, repo="gpt2"):
    """Put `model_dir`'s files into the hub cache as a snapshot of `repo`, content-addressed."""
    root = hf_home / "hub" / f"models--{repo}"
    snapshot = root / "snapshots" / REVISION
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


def taskvec(*args, env, cwd):
    result = subprocess.run([sys.executable, "-m", "taskvec", *map(str, args)], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"taskvec {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_readme_recipe_with_the_hub_gpt2_layout(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64)
    hub_files = tmp_path / "hub-gpt2"
    gpt2_hub_layout(model, hub_files)
    tokenizer.save_pretrained(hub_files)
    hf_home = tmp_path / "hf"
    fill_cache(hf_home, hub_files)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    work = tmp_path / "work"
    work.mkdir()
    (work / "toxic.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TOXIC * 4))
    (work / "ppl.txt").write_text("The cat sat on the mat and looked at the garden.\n" * 4)
    (work / "prompts.txt").write_text("Hello world\nThe dog\n")

    taskvec("data", "split", "toxic.jsonl", "--splits", 2, "-o", "toxic-splits", env=env, cwd=work)
    taskvec("train-splits", "toxic-splits", "--base", "gpt2", "-o", "runs", "--lr", 1e-3, "--batch-size", 4,
            "--max-steps", 2, "--max-length", 16, env=env, cwd=work)
    merged = taskvec("merge", "--base", "gpt2", "--scale", 1.0, "-o", "gpt2-merged", "runs/split-00", "runs/split-01",
                     env=env, cwd=work)
    assert "renamed to GPT2LMHeadModel's current names" in merged.stderr
    assert "buffers that transformers drops on load left out" in merged.stderr
    taskvec("eval", "gpt2-merged", "-o", "evals/merged", "--ppl-file", "ppl.txt", "--prompts", "prompts.txt",
            "-k", 1, "--max-new-tokens", 3, "--scorer", "profanity", env=env, cwd=work)

    out = work / "gpt2-merged"
    summary = json.loads((work / "evals" / "merged" / "summary.json").read_text())
    assert summary["perplexity"] > 0
    stored = load_file(hub_files / "model.safetensors")
    base = {f"transformer.{k}": v for k, v in stored.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    fts = [load_dir(work / "runs" / f"split-0{i}") for i in range(2)]
    merged_weights = load_dir(out)
    assert set(merged_weights) == set(base)
    for name, value in merged_weights.items():
        reference = negated_mean_f64(base[name], [ft[name] for ft in fts], 1.0)
        torch.testing.assert_close(value.double(), reference, rtol=0, atol=1e-6)
    assert not torch.equal(merged_weights["transformer.wte.weight"], base["transformer.wte.weight"])
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


def fake_hub(monkeypatch, tmp_path, remote):
    """snapshot_download over a local 'remote' repository: copies the files that the patterns
    select into a snapshot folder, as the hub client does, and records each call's patterns."""
    import fnmatch
    import shutil

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(list(allow_patterns))
        snapshot = tmp_path / "cache" / repo_id / "snapshot"
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in remote.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copyfile(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_model_with_only_bin_weights_is_fetched_with_them(tmp_path, monkeypatch):
    """Fetching safetensors only would give train and eval a model directory without weights."""
    from taskvec.hf import load_causal_lm
    from taskvec.io.checkpoint import resolve_model_path

    tokenizer = byte_level_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    remote = tmp_path / "remote"
    remote.mkdir()
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, remote / "pytorch_model.bin")
    (remote / "tf_model.h5").write_bytes(b"not for us")
    model.config.save_pretrained(remote)
    tokenizer.save_pretrained(remote)
    calls = fake_hub(monkeypatch, tmp_path, remote)
    snapshot = resolve_model_path("org/bin-only")
    assert len(calls) == 2 and "*.safetensors" in calls[0] and "*.bin" in calls[1]
    assert (snapshot / "pytorch_model.bin").is_file() and not (snapshot / "tf_model.h5").exists()
    loaded = load_causal_lm("org/bin-only")
    torch.testing.assert_close(loaded.model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                               model.state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_a_hub_model_with_safetensors_is_fetched_once(tmp_path, monkeypatch):
    from taskvec.io.checkpoint import resolve_model_path

    model = tiny_model("gpt2")
    remote = tmp_path / "remote"
    model.save_pretrained(remote)
    torch.save(model.state_dict(), remote / "pytorch_model.bin")
    calls = fake_hub(monkeypatch, tmp_path, remote)
    snapshot = resolve_model_path("org/both")
    assert len(calls) == 1 and not (snapshot / "pytorch_model.bin").exists()
    assert (snapshot / "model.safetensors").is_file()


def test_a_hub_cache_snapshot_given_as_a_path_is_named_by_its_repository(tmp_path):
    """Provenance named such a base by its revision hash (the snapshot folder's name)."""
    from taskvec.merge import merge_checkpoints

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "files")
    fill_cache(tmp_path / "hf", tmp_path / "files", repo="acme--tiny")
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / REVISION
    (ft,) = perturbed_copies(model, tmp_path, 1)
    merge_checkpoints([ft], tmp_path / "out", base=snapshot, progress=False)
    provenance = json.loads((tmp_path / "out" / "taskvec.json").read_text())
    assert provenance["base"]["name"] == "acme/tiny"
    merge_checkpoints([ft], tmp_path / "out-file", base=snapshot / "model.safetensors", progress=False)
    named = json.loads((tmp_path / "out-file" / "taskvec.json").read_text())["base"]["name"]
    assert named == "acme/tiny/model.safetensors"
