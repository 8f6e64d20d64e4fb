"""Checkpoints: round trip of model, optimizer and metadata, rebuilding from the file,
and a CheckpointError naming the file for every kind of bad file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparsefedpp.runtime import SGD, build, softmax_cross_entropy
from sparsefedpp.runtime import checkpoint as ckpt
from sparsefedpp.runtime.errors import CheckpointError

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)


def trained(name="resnet8", seed=0):
    """A small model after two SGD steps (moved running stats, momentum buffers)."""
    model = build(name, width=0.25, seed=seed)
    opt = SGD(model.params(), model.grads(), 0.1, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    for _ in range(2):
        model.zero_grad()
        _, grad = softmax_cross_entropy(model.forward(x, train=True), y)
        model.backward(grad)
        opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = trained()
    path = ckpt.save(tmp_path / "run" / "model.npz", model, opt, meta={"round": 3})
    return path, model, opt


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, arr in a.items():
        np.testing.assert_array_equal(arr, b[name], err_msg=name)


# ---------------------------------------------------------------- round trip
def test_round_trip_restores_model_optimizer_and_meta(saved):
    # Arrange
    path, model, opt = saved
    fresh = build("resnet8", width=0.25, seed=99)
    fresh_opt = SGD(fresh.params(), fresh.grads(), 0.1, momentum=0.9,
                    weight_decay=5e-4)
    # Act
    loaded, meta = ckpt.load(path, fresh, fresh_opt)
    # Assert
    assert loaded is fresh
    assert meta == {"round": 3}
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.momentum_buffers, opt.momentum_buffers)
    assert fresh.state_dict()["bn1.num_batches_tracked"] == 2


def test_load_without_model_rebuilds_the_architecture(saved):
    path, model, _ = saved
    loaded, _ = ckpt.load(path)
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_powerprop_alpha_travels_with_the_checkpoint(tmp_path):
    model = build("cnn", width=0.25, alpha=1.25, seed=0)
    path = ckpt.save(tmp_path / "pp.npz", model)
    loaded, _ = ckpt.load(path)
    assert loaded.alpha == 1.25
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_file_opens_with_numpy_alone_and_holds_no_pickle(saved):
    path, model, _ = saved
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(bytes(z["meta"]).decode())
        fc_weight = z["model/fc.weight"]
    np.testing.assert_array_equal(fc_weight, model.state_dict()["fc.weight"])
    assert header["format"] == ckpt.FORMAT
    assert header["version"] == ckpt.VERSION


def test_save_leaves_no_temporary_file(saved):
    path, _, _ = saved
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_unserialisable_meta_raises_checkpoint_error(tmp_path):
    model = build("cnn", width=0.25, seed=0)
    with pytest.raises(CheckpointError):
        ckpt.save(tmp_path / "m.npz", model, meta={"when": object()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad files
def assert_names_path(err, path):
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert_names_path(err, path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(blob=st.binary(min_size=0, max_size=2000))
def test_random_bytes(tmp_path, blob):
    path = tmp_path / "random.npz"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert_names_path(err, path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file(saved, keep):
    # Arrange
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    # Act / Assert
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert_names_path(err, path)


def test_flipped_bytes_in_a_compressed_tensor(tmp_path):
    # np.savez stores without compression; a damaged zip CRC must still be caught
    model = build("cnn", width=0.25, seed=0)
    path = ckpt.save(tmp_path / "m.npz", model)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert_names_path(err, path)


def write_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def header_bytes(**changes):
    header = {"format": ckpt.FORMAT, "version": ckpt.VERSION,
              "model": build("cnn", width=0.25, seed=0).config, "meta": {}}
    header.update(changes)
    return np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)


@pytest.mark.parametrize(("meta", "expected"), [
    (header_bytes(format="onnx"), "format"),
    (header_bytes(version=2), "version"),
    (header_bytes(version="1"), "version"),
    (header_bytes(model=None), "model config"),
    (np.frombuffer(b"\xff\xfe not json", dtype=np.uint8), "JSON"),
    (np.frombuffer(b"[1, 2]", dtype=np.uint8), "format"),
    (None, "meta"),
], ids=["format", "version-2", "version-str", "no-model", "not-json", "json-list",
        "no-meta"])
def test_bad_header(tmp_path, meta, expected):
    # Arrange: valid model tensors, broken metadata
    arrays = {f"model/{k}": v
              for k, v in build("cnn", width=0.25, seed=0).state_dict().items()}
    if meta is not None:
        arrays["meta"] = meta
    path = write_npz(tmp_path / "bad.npz", **arrays)
    # Act / Assert
    with pytest.raises(CheckpointError, match=expected) as err:
        ckpt.load(path)
    assert_names_path(err, path)


def test_a_plain_npy_file(tmp_path):
    path = tmp_path / "weights.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert_names_path(err, path)


def test_checkpoint_of_another_architecture(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path, build("cnn", width=0.25, seed=0))
    assert_names_path(err, path)


def test_checkpoint_with_missing_tensor(tmp_path):
    # Arrange: the header says cnn, but one tensor is gone
    model = build("cnn", width=0.25, seed=0)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items() if k != "fc.bias"}
    path = write_npz(tmp_path / "m.npz", meta=header_bytes(), **arrays)
    # Act / Assert
    with pytest.raises(CheckpointError, match="fc.bias") as err:
        ckpt.load(path)
    assert_names_path(err, path)


def test_failed_load_leaves_the_model_untouched(tmp_path):
    # Arrange: a checkpoint whose last tensor holds NaN
    model = build("cnn", width=0.25, seed=0)
    before = model.state_dict()
    state = build("cnn", width=0.25, seed=1).state_dict()
    state["fc.bias"][0] = np.nan
    arrays = {f"model/{k}": v for k, v in state.items()}
    path = write_npz(tmp_path / "m.npz", meta=header_bytes(), **arrays)
    # Act
    with pytest.raises(CheckpointError, match="fc.bias"):
        ckpt.load(path, model)
    # Assert
    assert_same_state(model.state_dict(), before)


def test_saved_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    from sparsefedpp.runtime import checkpoint as ck
    from sparsefedpp.runtime import models as zoo

    path = ck.save(tmp_path / "m.npz", zoo.build("cnn", width=0.25, seed=0))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
