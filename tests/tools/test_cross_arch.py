"""tools/cross_arch.py: the dump and the comparison that .ci/aarch64.sh runs across
x86-64 and emulated aarch64, checked here on one machine (two dumps agree; perturbed
ones do not), and the staging of the package for the emulated run."""

from __future__ import annotations

import numpy as np
import pytest
from sparsefedpp.tools import cross_arch


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross_arch")
    a, b = folder / "a.npz", folder / "b.npz"
    cross_arch.dump(a)
    cross_arch.dump(b)
    return a, b


def _load(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _changed(src, dst, key, change):
    arrays = _load(src)
    if change is None:
        del arrays[key]
    else:
        arrays[key] = change(arrays[key].copy())
    np.savez(dst, **arrays)
    return dst


def _scale_largest(factor):
    def change(a):
        i = np.argmax(np.abs(a))
        a.flat[i] *= factor
        return a
    return change


def test_dump_holds_logits_gradients_and_codec_bytes(dumps):
    arrays = _load(dumps[0])
    for key, name, *_ in cross_arch.CASES:
        assert arrays[f"{key}/logits"].shape == (cross_arch.BATCH[0], 10)
        assert arrays[f"{key}/grad_input"].shape == cross_arch.BATCH
        assert arrays[f"{key}/grad/conv1.weight"].any()
        assert arrays[f"{key}/grad/fc.bias"].shape == (10,)
        for enc in cross_arch.ENCODINGS:
            blob = arrays[f"codec/{key}/{enc}"]
            assert blob.dtype == np.uint8 and bytes(blob[:4]) == b"SFPP"
    assert "resnet8/buffer/bn1.running_var" in arrays
    assert str(arrays["meta/machine"])


def test_the_dump_is_the_step_the_engine_takes(dumps):
    from sparsefedpp.runtime.wire import codec
    arrays = _load(dumps[0])
    decoded = codec.decode(bytes(arrays["codec/cnn/csr"]))
    # the CSR and the dense kernels saw the same pruned model
    assert decoded.tensors["conv1.weight"].shape[0] > 0
    assert np.mean(decoded.tensors["conv2.weight"] == 0) >= 0.79
    np.testing.assert_allclose(arrays["cnn_csr/logits"], arrays["cnn/logits"],
                               rtol=1e-5, atol=1e-6)


def test_two_dumps_on_one_machine_agree(dumps, capsys):
    assert cross_arch.main(["compare", str(dumps[0]), str(dumps[1])]) == 0
    out = capsys.readouterr().out
    assert "cross-arch: agree" in out and "FAIL" not in out
    assert "codec/resnet8/csr-f16:" in out and "identical" in out


def test_a_difference_within_the_tolerance_passes(dumps, tmp_path):
    b = _changed(dumps[1], tmp_path / "b.npz", "resnet8/grad/conv1.weight",
                 _scale_largest(1 + 2e-6))
    _, failures = cross_arch.compare(dumps[0], b)
    assert failures == []


def test_a_gradient_off_by_more_than_the_tolerance_fails(dumps, tmp_path, capsys):
    b = _changed(dumps[1], tmp_path / "b.npz", "resnet8/grad/conv1.weight",
                 _scale_largest(1 + 1e-4))
    assert cross_arch.main(["compare", str(dumps[0]), str(b)]) == 1
    out = capsys.readouterr().out
    assert "FAIL resnet8/grad/conv1.weight" in out
    assert "cross-arch: 1 differ" in out


def test_the_tolerance_is_relative_to_the_largest_magnitude(dumps, tmp_path):
    # a change of 1e-4 of the largest value, put on the smallest: still too much
    def bump_smallest(a):
        scale = np.abs(a).max()
        a.flat[np.argmin(np.abs(a))] += 1e-4 * scale
        return a
    b = _changed(dumps[1], tmp_path / "b.npz", "cnn/logits", bump_smallest)
    _, failures = cross_arch.compare(dumps[0], b)
    assert [f.split(":")[0] for f in failures] == ["cnn/logits"]
    _, failures = cross_arch.compare(dumps[0], b, rtol=2e-4)
    assert failures == []


def test_one_flipped_codec_byte_fails(dumps, tmp_path):
    def flip(blob):
        blob[len(blob) // 2] ^= 1
        return blob
    b = _changed(dumps[1], tmp_path / "b.npz", "codec/cnn_csr/csr", flip)
    _, failures = cross_arch.compare(dumps[0], b)
    assert len(failures) == 1 and failures[0].startswith("codec/cnn_csr/csr: 1 bytes")


@pytest.mark.parametrize(("change", "expected"), [
    (None, "only in A"),
    (lambda a: a[:-1], "float32(4, 10) vs float32(3, 10)"),
    (lambda a: a.astype(np.float64), "float32(4, 10) vs float64(4, 10)"),
    (lambda a: np.where(a == a.max(), np.nan, a).astype(a.dtype), "non-finite"),
], ids=["missing", "shape", "dtype", "nan"])
def test_missing_reshaped_retyped_or_nan_arrays_fail(dumps, tmp_path, change, expected):
    b = _changed(dumps[1], tmp_path / "b.npz", "cnn/logits", change)
    _, failures = cross_arch.compare(dumps[0], b)
    assert len(failures) == 1 and expected in failures[0]


# ------------------------------------------------------------------------ stage
def test_stage_mirrors_the_package_dirs_and_rewrites_only_changed_files(tmp_path):
    repo, dest = tmp_path / "repo", tmp_path / "dest"
    for folder in cross_arch.PACKAGE_DIRS.values():
        (repo / folder / "__pycache__").mkdir(parents=True)
        (repo / folder / "__init__.py").write_text("")
        (repo / folder / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (repo / "runtime" / "kernels").mkdir()
    (repo / "runtime" / "kernels" / "conv.py").write_text("A = 1\n")
    (repo / "runtime" / "gone.py").write_text("")
    assert cross_arch.stage(repo, dest) == 7  # __init__ of the root + 6 files
    conv = dest / "sparsefedpp" / "runtime" / "kernels" / "conv.py"
    assert conv.read_text() == "A = 1\n"
    assert not (dest / "sparsefedpp" / "tools" / "__pycache__").exists()
    stamp = conv.stat().st_mtime_ns
    # unchanged: nothing written, the mtime Numba's cache keys on stays
    (repo / "runtime" / "gone.py").unlink()
    (repo / "trainer" / "new.py").write_text("B = 2\n")
    assert cross_arch.stage(repo, dest) == 2
    assert conv.stat().st_mtime_ns == stamp
    assert not (dest / "sparsefedpp" / "runtime" / "gone.py").exists()
    assert (dest / "sparsefedpp" / "trainer" / "new.py").read_text() == "B = 2\n"
    (repo / "runtime" / "kernels" / "conv.py").write_text("A = 2\n")
    assert cross_arch.stage(repo, dest) == 1
    assert conv.read_text() == "A = 2\n"
