"""Fixtures shared by the whole suite: small synthetic GPT-2 checkpoints, made once per session."""

import os
import shutil

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before
# triton decorates any kernel: here, since this file is loaded before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from taskvec.synthetic import write_synthetic


@pytest.fixture(scope="session")
def synthetic_sets(tmp_path_factory):
    """(dtype, sharded) -> SyntheticSet of a tiny GPT-2 base and 5 fine-tunes."""
    cache = {}

    def get(dtype="float32", sharded=False):
        key = (dtype, sharded)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"synthetic-{dtype}-{'sharded' if sharded else 'single'}")
            cache[key] = write_synthetic(root, size="tiny", n_finetuned=5, dtype=dtype,
                                         max_shard_size=150_000 if sharded else None)
        return cache[key]

    return get


@pytest.fixture
def workdir(synthetic_sets, tmp_path):
    """A private copy of a tiny set (base + 2 fine-tunes) that a test may damage."""
    sset = synthetic_sets("float32")
    base = shutil.copytree(sset.base, tmp_path / "base")
    fts = [shutil.copytree(p, tmp_path / f"ft{i}") for i, p in enumerate(sset.finetuned[:2])]
    return base, fts
