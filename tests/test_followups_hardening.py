"""Issue 12 follow-ups: --seed ranges of train-splits and demo."""

import pytest
from cli_errors import refused
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.errors import TaskvecError


def _must_not_run(*args, **kwargs):
    raise TaskvecError("ran past the option check")


@pytest.mark.parametrize("seed", [2**32, 2**64, 10**40, -1])
def test_train_splits_seed_out_of_range(tmp_path, monkeypatch, seed):
    import taskvec.train

    monkeypatch.setattr(taskvec.train, "train_splits", _must_not_run)
    refused(tmp_path, "train-splits", tmp_path / "splits", "-o", tmp_path / "runs", "--seed", seed,
            where="Invalid value for '--seed'", status=2)


@pytest.mark.parametrize("seed", [2**32, 2**64, 10**40, -1])
def test_demo_seed_out_of_range(tmp_path, monkeypatch, seed):
    import taskvec.demo.pipeline

    monkeypatch.setattr(taskvec.demo.pipeline, "run_demo", _must_not_run)
    refused(tmp_path, "demo", "-o", tmp_path / "demo", "--seed", seed, where="Invalid value for '--seed'", status=2)


def test_largest_seed_reaches_training(tmp_path, monkeypatch):
    import taskvec.train

    seen = []
    monkeypatch.setattr(taskvec.train, "train_splits", lambda *args, **kwargs: seen.append(args[3]) or [])
    result = CliRunner().invoke(main, ["train-splits", str(tmp_path / "splits"), "-o", str(tmp_path / "runs"),
                                       "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.output
    assert seen[0].seed == 2**32 - 1
