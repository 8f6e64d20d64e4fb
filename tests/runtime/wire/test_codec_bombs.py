"""runtime/wire/codec.py, decoding bounded by the announced model (issue 14, item 3).

Bombs are real zlib / xz streams of zeros (tens of KB stored, tens or hundreds of
MB inflated) behind hand-built tensor tables; each must be refused with a
CodecError in well under a second and a few MB of peak memory (tracemalloc sees
numpy, zlib and liblzma allocations). Legit messages of every preset decode the
same with and without ``like``.
"""

from __future__ import annotations

import lzma
import math
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import CodecError, ConfigError
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.wire.codec import ENCODINGS, Encoding, Message, decode, encode

pytestmark = pytest.mark.device

MiB = 1 << 20


# ------------------------------------------------------------------ helpers
def frame(entries: list[bytes], code: int, stream: bytes, *, kind: int = 1) -> bytes:
    """A message from the docstring's layout: sender dev1, method topk, meta {}."""
    out = struct.pack("<4sHBBIQ", b"SFPP", 1, 0, kind, 0, 10) + b"\x04dev1\x04topk"
    out += struct.pack("<I", 2) + b"{}" + struct.pack("<I", len(entries))
    out += b"".join(entries) + struct.pack("<BQ", code, len(stream)) + stream
    return out + struct.pack("<I", zlib.crc32(out))


def dense_entry(name: str, dtype, shape: tuple) -> bytes:
    raw, size = name.encode(), int(np.prod(shape, dtype=np.int64))
    dcode, vcode, item = (1, 1, 4) if np.dtype(dtype) == np.float32 else (2, 3, 8)
    return (bytes([len(raw)]) + raw + struct.pack("<BB", dcode, len(shape))
            + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BBBBIQ", 0, 0, 0, vcode, size, size * item))


def table(spec: dict) -> tuple[list[bytes], int]:
    """Dense entries matching ``spec`` exactly, and their raw body size."""
    entries = [dense_entry(k, dt, shape) for k, (dt, shape) in spec.items()]
    raw = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
              for dt, shape in spec.values())
    return entries, raw


def zeros_stream(n: int, code: int, dict_size: int = 64 << 10) -> bytes:
    """A real bomb: a zlib (code 1) or xz (code 2) stream of n zero bytes."""
    if code == 1:
        enc = zlib.compressobj(9)
    else:
        enc = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=[
            {"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": dict_size}])
    step, parts = bytes(min(n, 8 * MiB)), []
    for start in range(0, n, len(step)):
        parts.append(enc.compress(step[:min(len(step), n - start)]))
    return b"".join(parts) + enc.flush()


def refused_cheaply(data: bytes, match: str, *, peak: int = 3 * MiB, **kwargs) -> None:
    """decode(data) raises CodecError(match) in < 0.5 s with < ``peak`` traced."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CodecError, match=match):
            decode(data, **kwargs)
        elapsed = time.perf_counter() - start
        used = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, f"took {elapsed:.3f} s"
    assert used < peak, f"peak {used / MiB:.1f} MiB"


@pytest.fixture(scope="module")
def r8() -> dict:
    return codec.model_spec(models.build("resnet8", seed=0).state_dict())


@pytest.fixture(scope="module")
def r18() -> dict:
    return codec.model_spec(models.build("resnet18", seed=0).state_dict())


@pytest.fixture(scope="module")
def r18_bomb(r18) -> dict[int, bytes]:
    """zlib and xz streams of as many zeros as ResNet-18's dense body (44.7 MB)."""
    raw = table(r18)[1]
    return {code: zeros_stream(raw, code) for code in (1, 2)}


@pytest.fixture(scope="module", params=[1, 2], ids=["zlib", "xz"])
def bomb512(request) -> tuple[int, bytes]:
    """Issue 14's bomb: tens of KB of stream, one table entry of 2**27 float32."""
    code = request.param
    stream = zeros_stream(32 * MiB, code)  # the head of a 512 MiB stream of zeros
    return code, frame([dense_entry("x", np.float32, (2**27,))], code, stream)


# ------------------------------------------------------------------ (a) wrong table
def test_the_issue_bomb_is_refused_at_its_table(bomb512, r8, r18):
    code, data = bomb512
    assert len(data) < 80_000
    for spec in (r8, r18):
        refused_cheaply(data, "'x': expected a tensor of the announced model",
                        like=spec)
        refused_cheaply(data, "tensor count: expected 56|tensor count: expected 122",
                        like=spec, exact=True)


@pytest.mark.parametrize("change", ["name", "dtype", "shape", "ndim", "count", "missing"])
def test_a_table_unlike_the_model_is_refused_before_the_body(change, r18, r18_bomb):
    spec = dict(r18)
    name, (dtype, shape) = "layer1.0.conv1.weight", r18["layer1.0.conv1.weight"]
    if change == "name":
        spec["evil.weight"] = spec.pop(name)
    elif change == "dtype":
        spec[name] = (np.dtype(np.int64), shape)
    elif change == "shape":
        spec[name] = (dtype, (shape[0] * 64,) + shape[1:])
    elif change == "ndim":
        spec[name] = (dtype, shape + (64,))
    elif change == "count":
        spec["extra.weight"] = (dtype, (2**20,))
    else:
        del spec[name]
    data = frame(table(spec)[0], 1, r18_bomb[1])
    match = {"name": "'evil.weight': expected a tensor of the announced",
             "dtype": "expected float32 .* got int64", "shape": "as in the announced",
             "ndim": "as in the announced", "count": "tensor count: expected 122 .*got 123",
             "missing": "tensor count: expected 122"}[change]
    refused_cheaply(data, match, like=r18, exact=True)


# ------------------------------------------------------------------ (b) ratio
@pytest.mark.parametrize("code", [1, 2], ids=["zlib", "xz"])
def test_a_bomb_matching_resnet18_is_refused_for_its_ratio_before_inflating(
        code, r18, r18_bomb):
    # 44.7 MB declared, all dense, exactly the model, and a stream that inflates to it
    data = frame(table(r18)[0], code, r18_bomb[code])
    assert len(data) < 50_000
    refused_cheaply(data, "raw bytes per stored byte", like=r18, exact=True)
    refused_cheaply(data, "raw bytes per stored byte")  # the ratio needs no like


# ------------------------------------------------------------------ (c) lying raw size
@pytest.mark.parametrize("code", [1, 2], ids=["zlib", "xz"])
def test_a_stream_longer_than_its_table_is_cut_after_one_piece(code, r8):
    entries, raw = table(r8)  # 315 KB declared, under RATIO_FLOOR
    data = frame(entries, code, zeros_stream(32 * MiB, code))
    assert len(data) < 60_000 and raw < codec.RATIO_FLOOR
    refused_cheaply(data, "stream of 314928 bytes .the tensor table., got more",
                    like=r8, exact=True)


@pytest.mark.parametrize("code", [1, 2], ids=["zlib", "xz"])
def test_a_front_loaded_bomb_stops_at_the_running_ratio(code, r18):
    """The declared size passes (stored padded to raw / max_ratio), but the first
    pieces inflate far beyond max_ratio: stopped long before the end."""
    entries, raw = table(r18)
    head = zeros_stream(8 * MiB, code)
    body = head + bytes(int(raw / codec.DEFAULT_MAX_RATIO) + 1 - len(head))
    data = frame(entries, code, body)
    # the preallocated buffer of the declared size is all it holds, plus a piece
    refused_cheaply(data, "inflated bytes per stored byte, got .* from the first",
                    peak=raw + MiB, like=r18, exact=True)


@pytest.mark.parametrize("code", [1, 2], ids=["zlib", "xz"])
def test_a_stream_shorter_than_its_table_is_refused(code, r8):
    entries, raw = table(r8)
    data = frame(entries, code, zeros_stream(raw - 1, code))
    refused_cheaply(data, f"complete {('zlib', 'xz')[code - 1]} stream of {raw} bytes",
                    like=r8)


@pytest.mark.parametrize("code", [1, 2], ids=["zlib", "xz"])
def test_a_stream_ending_before_the_stored_body_is_refused(code, r8):
    entries, raw = table(r8)
    data = frame(entries, code, zeros_stream(raw, code) + b"\0" * 100)
    refused_cheaply(data, "complete .* stream", like=r8)


def test_an_xz_dictionary_larger_than_the_declared_body_is_refused_unallocated(r8):
    entries, raw = table(r8)
    stream = zeros_stream(raw, 2, dict_size=8 * MiB)  # legal xz, but 8 MiB of window
    refused_cheaply(frame(entries, 2, stream), "valid xz stream, got .*[Mm]emory",
                    peak=MiB, like=r8)


def test_input_longer_than_the_model_can_be_is_refused_unread(r8):
    limit = codec.max_encoded_size(r8)
    refused_cheaply(bytes(limit + 1), f"expected <= {limit} bytes for the announced",
                    like=r8)
    with pytest.raises(CodecError, match="magic"):  # at the limit it is read
        decode(bytes(limit), like=r8)


# ------------------------------------------------------------------ legit messages
def pruned_state(name: str, sparsity: float, trained_bn: bool) -> dict:
    model = models.build(name, alpha=1.25, seed=0)
    pruning.prune(model, sparsity)
    tensors = {k: np.array(v) for k, v in model.state_dict().items()}
    if trained_bn:  # fresh BatchNorm (1, 0, 0, 1) compresses far better than real
        rng = np.random.default_rng(1)
        for key, arr in tensors.items():
            if arr.dtype == np.int64:
                arr[...] = 3910
            elif arr.ndim == 1:
                arr[:] = np.abs(rng.normal(1.0, 0.3, arr.shape)) + 0.05
    return tensors


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.999])
@pytest.mark.parametrize("trained_bn", [False, True], ids=["fresh", "trained"])
def test_every_preset_decodes_the_same_with_and_without_like(name, sparsity, trained_bn):
    tensors = pruned_state(name, sparsity, trained_bn)
    spec = codec.model_spec(tensors)
    for kind in ("update", "model"):
        msg = Message(kind, 4, "dev1", "sparsefedpp", tensors, 500, {"loss": 1.5})
        for preset in ENCODINGS:
            data = encode(msg, preset)
            plain, bound = decode(data), decode(data, like=spec, exact=True)
            assert len(data) <= codec.max_encoded_size(spec, preset) \
                <= codec.max_encoded_size(spec)
            for got in (plain, bound):
                assert (got.kind, got.round, got.meta) == (kind, 4, {"loss": 1.5})
                assert list(got.tensors) == list(tensors)
                for key, arr in plain.tensors.items():
                    np.testing.assert_array_equal(got.tensors[key], arr)
                    assert got.tensors[key].dtype == tensors[key].dtype
            if "f16" not in preset:
                for key, arr in tensors.items():
                    np.testing.assert_array_equal(bound.tensors[key], arr)


def test_a_subset_of_the_model_decodes_unless_exact():
    tensors = {"a.weight": np.ones((3, 4), np.float32), "a.bias": np.zeros(3, np.float32),
               "n": np.array(5, np.int64)}
    data = encode(Message("update", 0, "d", "m", {"a.bias": tensors["a.bias"]}))
    assert list(decode(data, like=tensors).tensors) == ["a.bias"]
    with pytest.raises(CodecError, match="tensor count: expected 3"):
        decode(data, like=tensors, exact=True)


def test_max_ratio_refuses_a_legit_body_only_when_set_below_it():
    # runs of 8 equal floats: zlib stores ~4x less, quickly
    vals = np.repeat(np.random.default_rng(0).standard_normal(2**16), 8)
    vals = vals.astype(np.float32).reshape(512, 1024)
    data = encode(Message("model", 0, "s", "fedavg", {"w": vals}), "csr-zlib")
    code, raw, stored = codec._body_sizes(data)
    assert code == 1 and raw > codec.RATIO_FLOOR and 2 < raw / stored < 16
    np.testing.assert_array_equal(decode(data).tensors["w"], vals)
    with pytest.raises(CodecError, match="expected <= 2 raw bytes per stored byte"):
        decode(data, max_ratio=2)
    with pytest.raises(ConfigError, match="max_ratio"):
        decode(data, max_ratio=0.5)
    with pytest.raises(ConfigError, match="exact=True"):
        decode(data, exact=True)


# ------------------------------------------------------------------ mismatches
NAMES = st.sampled_from(["conv.weight", "bn.running_var", "fc.weight", "fc.bias",
                         "n", "layer1.0.conv2.weight"])
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def model_and_forgery(draw):
    """A small spec, and one message changed from it in one way."""
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    spec = {n: (np.dtype(np.int64 if n == "n" else np.float32),
                () if n == "n" else draw(SHAPES)) for n in names}
    forged = dict(spec)
    change = draw(st.sampled_from(["rename", "dtype", "shape", "extra", "drop", "none"]))
    victim = draw(st.sampled_from(names))
    dtype, shape = spec[victim]
    if change == "rename":
        forged["x." + victim] = forged.pop(victim)
    elif change == "dtype":
        forged[victim] = (np.dtype(np.float32 if dtype == np.int64 else np.int64), shape)
    elif change == "shape":
        new = draw(SHAPES.filter(lambda s, old=shape: s != old))
        forged[victim] = (dtype, new)
    elif change == "extra":
        forged["extra"] = (np.dtype(np.float32), draw(SHAPES))
    elif change == "drop":
        del forged[victim]
    return spec, forged, change


@settings(max_examples=150, deadline=None)
@given(case=model_and_forgery(), preset=st.sampled_from(sorted(ENCODINGS)),
       exact=st.booleans())
def test_any_single_mismatch_with_the_model_is_refused(case, preset, exact):
    spec, forged, change = case
    rng = np.random.default_rng(0)
    tensors = {k: (rng.integers(-5, 5, shape) if dt == np.int64
                   else rng.standard_normal(shape)).astype(dt)
               for k, (dt, shape) in forged.items()}
    data = encode(Message("update", 1, "d", "m", tensors), preset)
    if change == "none" or change == "drop" and not exact:
        got = decode(data, like=spec, exact=exact)
        assert set(got.tensors) == set(forged)
        return
    match = {"rename": "unknown name|tensor count", "dtype": "as in the announced",
             "shape": "as in the announced", "extra": "unknown name|tensor count",
             "drop": "tensor count: expected"}[change]
    with pytest.raises(CodecError, match=match):
        decode(data, like=spec, exact=exact)


# ------------------------------------------------------------------ helpers' API
def test_model_spec_takes_arrays_or_pairs_and_refuses_what_cannot_travel():
    spec = codec.model_spec({"w": np.zeros((2, 3), np.float32),
                             "n": (np.int64, [])})
    assert spec == {"w": (np.dtype(np.float32), (2, 3)), "n": (np.dtype(np.int64), ())}
    assert codec.model_spec(spec) == spec
    for bad in ({"w": np.zeros(2)}, {"": np.zeros(2, np.float32)},
                {"w": (np.float32, (1,) * 9)}, {"w": 3}, [("w", np.zeros(2))]):
        with pytest.raises(ConfigError, match="like"):
            codec.model_spec(bad)  # type: ignore[arg-type]


ENCODING_FIELDS = st.builds(Encoding, st.sampled_from(["dense", "csr", "auto"]),
                            st.sampled_from(["int32", "narrow"]),
                            st.sampled_from(["f32", "f16"]),
                            st.sampled_from(["none", "zlib", "lzma"]))


@settings(max_examples=80, deadline=None)
@given(shapes=st.lists(SHAPES, min_size=1, max_size=4), enc=ENCODING_FIELDS,
       density=st.sampled_from([0.0, 0.3, 1.0]))
def test_max_encoded_size_bounds_every_encoding_with_the_longest_header(
        shapes, enc, density):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": np.where(rng.random(s) < density, rng.standard_normal(s), 0)
               .astype(np.float32) for i, s in enumerate(shapes)}
    tensors["count"] = np.array(3, np.int64)
    meta = {"k": "x" * (codec.MAX_META_BYTES - 10)}
    msg = Message("update", 1, "s" * 255, "m" * 64, tensors, 7, meta)
    size = len(encode(msg, enc))
    assert size <= codec.max_encoded_size(tensors, enc) <= codec.max_encoded_size(tensors)
    assert len(decode(encode(msg, enc), like=tensors, exact=True).tensors) == len(tensors)


def test_max_encoded_size_of_a_preset_is_the_dense_message_plus_the_header_room():
    tensors = pruned_state("resnet8", 0.0, False)
    spec = codec.model_spec(tensors)
    dense = len(encode(Message("update", 1, "", "m", tensors), "dense"))
    room = 255 + codec.MAX_METHOD_BYTES - 1 + codec.MAX_META_BYTES - 2
    assert codec.max_encoded_size(spec, "csr") == dense + room
    assert codec.max_encoded_size(spec, "csr-zlib") == dense + room
    csr = sum(4 * math.prod(shape) + 4 * (shape[0] + 1)  # forced CSR int32, full
              for dt, shape in spec.values() if dt == np.float32 and len(shape) >= 2)
    assert codec.max_encoded_size(spec) == codec.max_encoded_size(spec, "csr") + csr
