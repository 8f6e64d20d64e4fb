"""ONNX export and predict: checker, onnxruntime against the engine, sparse
initializers, metadata, real Fashion-MNIST, and clear errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sparsefedpp.runtime import checkpoint
from sparsefedpp.runtime.errors import CheckpointError, ConfigError
from sparsefedpp.runtime.layers import Conv2d, Layer
from sparsefedpp.runtime.layers.batchnorm import BatchNorm2d
from sparsefedpp.runtime.models import build
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.tools import cmd_export, onnx_export
from sparsefedpp.tools.cli import main
from sparsefedpp.tools.cmd_predict import ort_session

META = {"method": "sparsefedpp", "sparsity": 0.99, "classes": [f"c{i}" for i in range(10)],
        "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
TOL = 1e-4  # max abs difference of logits, engine vs onnxruntime


def _randomize_bn(model, rng: np.random.Generator, shape: tuple) -> None:
    """Running stats from one batch (so activations keep a sane scale), then
    perturbed, with random affine parameters: folding must really fold."""
    bns = [m for m in model.named_layers().values() if isinstance(m, BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # running stats := this batch's
    model.forward(rng.standard_normal(shape).astype(np.float32), train=True, grad=False)
    for bn in bns:
        n = bn.num_features
        bn.momentum = 0.1
        std = np.sqrt(bn.running_var)
        bn.running_mean += (0.3 * std * rng.standard_normal(n)).astype(np.float32)
        bn.running_var *= rng.uniform(0.5, 2.0, n).astype(np.float32)
        bn.weight[:] = rng.uniform(0.5, 1.5, n)
        bn.bias[:] = rng.normal(0.0, 0.3, n)


@functools.cache
def _model(name: str, width: float, sparsity: float, scope: str = "layer"):
    """A Powerprop (alpha 1.25) model, pruned, with non-trivial BatchNorm stats.

    Pruned per layer by default: global pruning of a fresh init empties whole layers (the CNN's
    conv3 at 99 %), which would leave constant logits and a vacuous comparison.
    The CNN (no BatchNorm) gets its kept weights scaled by 1/sqrt(density) so that
    its activations keep their scale.
    """
    model = build(name, width=width, alpha=1.25, seed=1)
    if sparsity:
        pruning.prune(model, sparsity, scope=scope)
    if sparsity and name == "cnn":
        gain = np.float32(((1.0 - sparsity) ** -0.5) ** (1 / 1.25))
        for layer in pruning.prunable_layers(model).values():
            layer.weight *= gain  # v scaled so that w = v|v|^0.25 grows by 1/sqrt(d)
    _randomize_bn(model, np.random.default_rng(2), (16, 3, 32, 32))
    return model


def _export(tmp_path: Path, model, **kwargs) -> Path:
    out = tmp_path / "model.onnx"
    cmd_export.export(model, META, out, **kwargs)
    return out


def _max_diff(path: Path, model, batch: int) -> tuple[float, float]:
    """Max |onnxruntime - engine| of the logits, and how much the engine's logits
    vary with the input (max over classes of the std over a 32-image batch)."""
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    got = ort_session(path, 1).run(None, {"input": x})[0]
    want = model.forward(x, train=False)
    x32 = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    spread = model.forward(x32, train=False).std(axis=0).max()
    return float(np.abs(got - want).max()), float(spread)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "fold"])
@pytest.mark.parametrize("sparsity", [0.0, 0.99], ids=["dense", "s99"])
@pytest.mark.parametrize("name,width", [
    pytest.param("cnn", 0.5, marks=pytest.mark.device), ("resnet8", 1.0),
    ("resnet18", 0.25)])
def test_onnxruntime_matches_engine(tmp_path, name, width, sparsity, fold_bn):
    # Arrange: the 99 % models also go through sparse initializers
    model = _model(name, width, sparsity)
    path = _export(tmp_path, model, fold_bn=fold_bn, sparse_initializers=sparsity > 0)
    # Act
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=not proto.graph.sparse_initializer)
    results = [_max_diff(path, model, batch) for batch in (1, 32)]
    # Assert: equal to 1e-4, on logits that depend on the input
    for diff, spread in results:
        assert diff <= TOL
        assert spread > 1e-3
    ops = {n.op_type for n in proto.graph.node}
    if fold_bn:
        assert "BatchNormalization" not in ops
    elif name != "cnn":  # the CNN has no BatchNorm
        assert "BatchNormalization" in ops
    if sparsity:
        assert len(proto.graph.sparse_initializer) > 0


@pytest.mark.parametrize("sparsity,fold_bn,sparse", [(0.0, False, False),
                                                      (0.99, True, True)])
def test_full_width_resnet18_batch1(tmp_path, sparsity, fold_bn, sparse):
    # Arrange
    model = _model("resnet18", 1.0, sparsity)
    # Act
    path = _export(tmp_path, model, fold_bn=fold_bn, sparse_initializers=sparse)
    diff, spread = _max_diff(path, model, 1)
    # Assert
    assert diff <= TOL and spread > 1e-3


def test_sparse_initializers_shrink_the_file_at_99(tmp_path):
    # Arrange: global pruning, as after a SparseFedPP round
    model = _model("resnet18", 0.25, 0.99, "global")
    # Act
    dense = tmp_path / "dense.onnx"
    sparse = tmp_path / "sparse.onnx"
    cmd_export.export(model, META, dense)
    cmd_export.export(model, META, sparse, sparse_initializers=True)
    # Assert: 12 B per nonzero at 1 % density is ~3 % of dense, plus BatchNorm
    assert sparse.stat().st_size < 0.1 * dense.stat().st_size
    x = np.ones((2, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(ort_session(dense, 1).run(None, {"input": x})[0],
                                  ort_session(sparse, 1).run(None, {"input": x})[0])
    diff, spread = _max_diff(sparse, model, 32)
    assert diff <= TOL and spread > 1e-3


def test_metadata_and_io_signature(tmp_path):
    # Arrange
    model = _model("resnet8", 1.0, 0.99)
    # Act
    proto = onnx.load(str(_export(tmp_path, model)))
    # Assert
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model"] == "resnet8" and float(props["width"]) == 1.0
    assert float(props["alpha"]) == 1.25 and props["method"] == "sparsefedpp"
    assert float(props["sparsity"]) == pytest.approx(0.99, abs=1e-4)
    assert json.loads(props["classes"]) == META["classes"]
    assert json.loads(props["mean"]) == META["mean"]
    assert json.loads(props["std"]) == META["std"]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 3
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the initializers hold w = v|v|^0.25, not v
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(init["conv1.weight"], model["conv1"].effective_weight())


@pytest.mark.device
def test_dense_weights_stay_dense_and_refusal_falls_back(tmp_path, monkeypatch):
    # Arrange
    model = _model("cnn", 0.5, 0.0)
    sparse_model = _model("cnn", 0.5, 0.99)
    # Act
    dense_result = cmd_export.export(model, META, tmp_path / "a.onnx",
                                     sparse_initializers=True)
    monkeypatch.setattr(cmd_export, "_onnxruntime_refuses", lambda blob: "refused")
    refused = cmd_export.export(sparse_model, META, tmp_path / "b.onnx",
                                sparse_initializers=True)
    # Assert
    assert dense_result["sparse_initializers"] == 0
    assert "written dense" in dense_result["notes"][0]
    assert refused["sparse_initializers"] == 0
    assert any("wrote every weight dense" in n for n in refused["notes"])
    assert not onnx.load(str(tmp_path / "b.onnx")).graph.sparse_initializer


@pytest.mark.device
def test_fold_keeps_zeros_exact():
    # Arrange
    conv = Conv2d(2, 3, 3, bias=True, alpha=1.25, rng=np.random.default_rng(0))
    conv.weight[:, 0] = 0.0
    bn = BatchNorm2d(3)
    bn.running_var[:] = [0.5, 2.0, 4.0]
    # Act
    w, b = onnx_export.fold_conv_bn(conv, bn)
    # Assert
    assert np.all(w[:, 0] == 0.0) and b.shape == (3,) and w.dtype == np.float32


@pytest.mark.device
def test_unknown_layer_is_a_config_error():
    class Odd(Layer):
        pass
    model = build("cnn", width=0.25, seed=0)
    model._children["odd"] = Odd()
    with pytest.raises(ConfigError, match="expected Conv2d.*got Odd"):
        onnx_export.build_onnx(model)


# --------------------------------------------------------------------- the CLI
def test_predict_agrees_on_fashion_mnist(tmp_path, capsys, fashion_mnist_dir):
    # Arrange: a briefly trained CNN, pruned to 90 %, exported with folding
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn", "--width", "0.5", "--data", "fashion-mnist",
                 "--epochs", "1", "--limit", "2000", "--test-limit", "100",
                 "--out", str(run), "--quiet"]) == 0
    ckpt = run / "model.npz"
    model, meta = checkpoint.load(ckpt)
    pruning.prune(model, 0.9)
    checkpoint.save(ckpt, model, meta=meta)
    onnx_path = tmp_path / "cnn.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path), "--fold-bn",
                 "--sparse-initializers", "--quiet"]) == 0
    capsys.readouterr()
    # Act
    outputs = {}
    for source, engine in [(ckpt, "dense"), (ckpt, "csr"), (ckpt, "onnxruntime"),
                           (onnx_path, "onnxruntime")]:
        assert main(["predict", str(source), "--data", "fashion-mnist", "--limit", "500",
                     "--engine", engine, "--json", "--threads", "1", "--quiet"]) == 0
        outputs[(source.suffix, engine)] = json.loads(capsys.readouterr().out)
    # Assert: same predictions everywhere. Chance is 10 %, with std 1.3 % on 500
    # images; this seeded run reaches ~37 %, so 20 % means "trained" with margin.
    first = outputs[(".npz", "dense")]
    assert first["num_examples"] == 500 and first["accuracy"] > 0.2
    for result in outputs.values():
        assert result["predictions"] == first["predictions"]
        assert result["accuracy"] == first["accuracy"]


def _truncated(tmp_path: Path) -> Path:
    good = checkpoint.save(tmp_path / "good.npz", build("cnn", width=0.25, seed=0))
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad


def _incompatible(tmp_path: Path) -> Path:
    path = tmp_path / "odd.npz"
    model = build("cnn", width=0.25, seed=0)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays["model/conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    header = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
              "model": model.config, "meta": {}}
    arrays["meta"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make,argv,error", [
    (_truncated, ["export", "{path}", "--onnx", "{tmp}/x.onnx"], CheckpointError),
    (_incompatible, ["export", "{path}", "--onnx", "{tmp}/x.onnx"], CheckpointError),
    (_truncated, ["predict", "{path}", "--data", "fashion-mnist"], CheckpointError),
    (None, ["export", "{tmp}/missing.npz", "--onnx", "{tmp}/x.onnx"], CheckpointError),
    (None, ["predict", "{tmp}/missing.onnx", "--data", "x"], CheckpointError),
    (None, ["predict", "{tmp}/junk.onnx", "--data", "x"], CheckpointError),
    (_truncated, ["export", "{tmp}/good.npz", "--onnx", "{tmp}"], ConfigError),
    (_truncated, ["export", "{tmp}/good.npz", "--onnx", "{tmp}/x.onnx", "--opset", "9"],
     ConfigError),
])
def test_bad_inputs_give_clear_errors(tmp_path, capsys, make, argv, error):
    # Arrange
    path = make(tmp_path) if make else None
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    argv = [a.format(path=path, tmp=tmp_path) for a in argv]
    # Act
    code = main(argv)
    # Assert: one line "error: <what>: expected ..., got ...", the class's exit code
    err = capsys.readouterr().err
    assert code == error.exit_code != 0
    assert err.startswith("error: ") and "expected" in err
    assert not (tmp_path / "x.onnx").exists()
