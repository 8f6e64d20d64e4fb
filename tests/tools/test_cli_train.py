"""The train and evaluate commands end to end on small real-data subsets."""

import json
from pathlib import Path

import numpy as np
import pytest
from sparsefedpp.runtime import checkpoint
from sparsefedpp.tools.cli import main

def _tiny_npz(path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    y = (x[:, :6].mean(axis=(1, 2)) > x[:, 6:].mean(axis=(1, 2))).astype(np.int64)
    np.savez(path, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    return path


@pytest.mark.slow
def test_resnet8_one_epoch_on_cifar_subset_beats_chance(tmp_path, cifar_dir):
    # Arrange: 3,000 real CIFAR-10 training images, 1,000 test images.
    data = cifar_dir
    out = tmp_path / "run"
    # Act
    code = main(["train", "--model", "resnet8", "--data", str(data), "--epochs", "1",
                 "--limit", "3000", "--test-limit", "1000", "--out", str(out),
                 "--quiet", "--lr", "0.05"])
    # Assert: chance is 10 %. On 1,000 test images the accuracy of a chance-level
    # model has std sqrt(0.1*0.9/1000) ~ 0.95 %, so 20 % is > 10 std above chance;
    # this run reaches ~25-30 % here (seeded), leaving a wide margin.
    assert code == 0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").open()
              if '"epoch"' in line and json.loads(line)["event"] == "epoch"]
    assert len(epochs) == 1
    assert epochs[0]["test_accuracy"] > 0.20
    assert np.isfinite(epochs[0]["train_loss"])
    _, meta = checkpoint.load(out / "model.npz")
    assert meta["epoch"] == 1 and meta["dataset"] == "cifar10"


def test_train_then_evaluate_and_resume_on_npz(tmp_path, capsys):
    # Arrange
    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    args = ["train", "--model", "cnn", "--width", "0.25", "--data", str(data),
            "--batch-size", "16", "--out", str(out), "--quiet", "--no-augment"]
    # Act
    assert main(args + ["--epochs", "1"]) == 0
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    code = main(["evaluate", str(out / "model.npz"), "--data", str(data), "--json"])
    # Assert
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_examples"] == 32
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]


def test_missing_data_and_corrupt_checkpoint_give_clear_errors(tmp_path, capsys):
    # Arrange
    bad = tmp_path / "model.npz"
    bad.write_bytes(b"not a zip file at all")
    # Act
    code_data = main(["train", "--data", str(tmp_path / "nowhere"), "--quiet"])
    err_data = capsys.readouterr().err
    code_ckpt = main(["evaluate", str(bad), "--data", "fashion-mnist"])
    err_ckpt = capsys.readouterr().err
    # Assert
    assert code_data != 0 and "error:" in err_data and "nowhere" in err_data
    assert code_ckpt != 0 and "error:" in err_ckpt and str(bad) in err_ckpt
    assert "Traceback" not in err_data + err_ckpt
