"""runtime/wire/codec.py: round trips, exact sizes, the documented layout, hostile input."""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sparsefedpp.runtime.errors import CodecError, ConfigError
from sparsefedpp.runtime.wire import codec, inflate
from sparsefedpp.runtime.wire.codec import (
    ENCODINGS,
    Encoding,
    Message,
    decode,
    encode,
    encoded_size,
)

pytestmark = pytest.mark.device  # part of the emulated-ARM subset (.ci/aarch64.sh)

FLOATS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


# ------------------------------------------------------------------ helpers
def small_message() -> Message:
    """The hand-computed example: a 4x3 weight with 2 nonzeros, a bias, a counter."""
    w = np.zeros((4, 3), np.float32)
    w[0, 1], w[3, 2] = 1.5, -2.0
    tensors = {"w": w, "b": np.array([1, 2, 3], np.float32),
               "n": np.array(7, np.int64)}
    return Message("update", 3, "dev1", "topk", tensors, num_examples=10)


def frame(*, magic=b"SFPP", version=1, flags=0, kind=1, rnd=3, num_examples=10,
          sender=b"dev1", method=b"topk", meta=b"{}", entries=(), count=None,
          compression=0, body=b"", stored=None, trailing=b"") -> bytes:
    """A message written field by field from the module docstring's layout."""
    out = struct.pack("<4sHBBIQ", magic, version, flags, kind, rnd, num_examples)
    out += bytes([len(sender)]) + sender + bytes([len(method)]) + method
    out += struct.pack("<I", len(meta)) + meta
    out += struct.pack("<I", len(entries) if count is None else count)
    out += b"".join(entries)
    out += struct.pack("<BQ", compression, len(body) if stored is None else stored)
    out += body + trailing
    return out + struct.pack("<I", zlib.crc32(out))


def entry(name=b"w", dtype=1, shape=(4, 3), layout=1, index=1, row=1, value=1,
          nnz=2, nbytes=14) -> bytes:
    return (bytes([len(name)]) + name + struct.pack("<BB", dtype, len(shape))
            + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BBBBIQ", layout, index, row, value, nnz, nbytes))


# body of the small example's "w" under "csr": values f32, u8 columns, u8 counts
W_BODY = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2]) + bytes([1, 0, 0, 1])
SMALL_ENTRIES = (entry(), entry(b"b", 1, (3,), 0, 0, 0, 1, 3, 12),
                 entry(b"n", 2, (), 0, 0, 0, 3, 1, 8))
SMALL_BODY = W_BODY + struct.pack("<3f", 1, 2, 3) + struct.pack("<q", 7)


def assert_same_tensors(got: dict, want: dict, *, f16: bool = False) -> None:
    assert list(got) == list(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        if f16 and arr.dtype == np.float32:
            np.testing.assert_allclose(got[name], arr, rtol=2**-10, atol=2**-14)
        else:
            np.testing.assert_array_equal(got[name], arr)


@st.composite
def tensor_dicts(draw):
    """1..5 tensors: 0-D..4-D float32 at density 0, 1 or drawn, or int64."""
    out = {}
    for i in range(draw(st.integers(1, 5))):
        ndim = draw(st.integers(0, 4))
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
        if draw(st.booleans()) and ndim <= 1:
            out[f"t{i}.int"] = draw(arrays(np.int64, shape))
            continue
        vals = draw(arrays(np.float32, shape, elements=FLOATS))
        density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.3]))
        keep = np.random.default_rng(i).random(shape) < density
        out[f"layer{i}.weight"] = np.where(keep, vals, np.float32(0))
    return out


ENCODING_FIELDS = st.builds(Encoding, st.sampled_from(["dense", "csr", "auto"]),
                            st.sampled_from(["int32", "narrow"]),
                            st.sampled_from(["f32", "f16"]),
                            st.sampled_from(["none", "zlib", "lzma"]))


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("preset", sorted(ENCODINGS))
def test_every_preset_round_trips_a_model_like_state(preset):
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    conv[rng.random(conv.shape) < 0.95] = 0
    conv[2] = 0  # an empty row
    tensors = {"conv.weight": conv, "bn.weight": np.ones(8, np.float32),
               "bn.running_var": rng.random(8).astype(np.float32),
               "bn.num_batches_tracked": np.array(12, np.int64),
               "fc.weight": rng.standard_normal((10, 300)).astype(np.float32),
               "fc.bias": np.zeros(10, np.float32)}
    msg = Message("model", 5, "server", "sparsefedpp", tensors, 0,
                  {"lr": 0.1, "n": np.int64(3)})
    data = encode(msg, preset)
    back = decode(data)
    assert len(data) == encoded_size(msg, preset)
    assert (back.kind, back.round, back.sender, back.method, back.meta) == (
        "model", 5, "server", "sparsefedpp", {"lr": 0.1, "n": 3})
    assert_same_tensors(back.tensors, tensors, f16="f16" in preset)
    assert all(a.flags.writeable and a.flags.c_contiguous
               for a in back.tensors.values())


@given(tensors=tensor_dicts(), enc=ENCODING_FIELDS,
       rnd=st.integers(0, 2**32 - 1), num=st.integers(0, 2**64 - 1),
       sender=st.text(max_size=20), kind=st.sampled_from(["model", "update"]))
def test_random_messages_round_trip(tensors, enc, rnd, num, sender, kind):
    msg = Message(kind, rnd, sender, "zerofl", tensors, num, {"acc": [1, 0.5]})
    back = decode(encode(msg, enc))
    assert (back.kind, back.round, back.num_examples, back.sender) == (
        kind, rnd, num, sender)
    assert back.meta == {"acc": [1, 0.5]}
    assert_same_tensors(back.tensors, tensors, f16=enc.values == "f16")


def test_negative_zero_survives_dense_and_becomes_plus_zero_in_csr():
    w = np.array([[-0.0, 1.0], [0.0, 0.0]], np.float32)
    msg = Message("update", 0, "d", "topk", {"w": w})
    dense = decode(encode(msg, "dense")).tensors["w"]
    assert np.signbit(dense[0, 0])
    sparse = decode(encode(msg, Encoding(sparse="csr"))).tensors["w"]
    np.testing.assert_array_equal(sparse, w)


# ------------------------------------------------------------------ sizes and layout
def test_small_example_has_the_hand_computed_size_and_bytes():
    # 43 fixed (20 prefix + 1 + 1 + 4 + 4 + 9 compression/stored length + 4 CRC)
    # + 4 "dev1" + 4 "topk" + 2 "{}"
    # + entries 19 + N + 4*ndim: w 19+1+8 = 28, b 19+1+4 = 24, n 19+1+0 = 20
    # + bodies: w CSR 2*4 values + 2*1 u8 columns + 4*1 u8 counts = 14 (dense 48),
    #   b 3*4 = 12, n 8
    expected = 43 + 4 + 4 + 2 + (28 + 24 + 20) + (14 + 12 + 8)
    assert expected == 159
    data = encode(small_message(), "csr")
    assert len(data) == encoded_size(small_message(), "csr") == 159
    assert data == frame(entries=SMALL_ENTRIES, body=SMALL_BODY)
    # csr32: w body = 8 values + 2*4 i32 columns + 5*4 i32 pointers = 36 < 48
    assert encoded_size(small_message(), "csr32") == 159 - 14 + 36
    # dense: w body 48
    assert encoded_size(small_message(), "dense") == 159 - 14 + 48


@given(w=arrays(np.float32, st.tuples(st.integers(0, 9), st.integers(0, 40)),
                elements=st.sampled_from([0.0, 0.0, 0.0, 1.0, -2.5])),
       index=st.sampled_from(["int32", "narrow"]))
def test_auto_picks_csr_only_when_strictly_smaller(w, index):
    msg = Message("update", 1, "d", "topk", {"w": w})
    auto, csr, dense = (encode(msg, Encoding(sparse=s, index=index))
                        for s in ("auto", "csr", "dense"))
    assert auto == (csr if len(csr) < len(dense) else dense)


def test_narrow_index_types_follow_column_count_and_longest_row():
    w = np.zeros((2, 300), np.float32)
    w[0, :256] = 1.0  # 300 columns -> u16 indices; a row of 256 -> u16 counts
    data = encode(Message("update", 0, "d", "m", {"w": w}), Encoding(sparse="csr"))
    table = data.index(b"\x01w") + 2  # name length + name, then the codes
    assert data[table:table + 14] == struct.pack("<BB2IBBBB", 1, 2, 2, 300, 1, 2, 2, 1)


def test_f16_halves_values_and_refuses_overflow():
    w = np.full((3, 4), 0.1, np.float32)
    msg = Message("update", 0, "d", "m", {"w": w})
    assert encoded_size(msg, "dense") - encoded_size(msg, Encoding("dense", values="f16")) == 24
    big = Message("update", 0, "d", "m", {"b": np.array([7e4], np.float32)})
    with pytest.raises(CodecError, match="65504"):
        encode(big, "csr-f16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values(bad):
    w = np.ones((2, 2), np.float32)
    w[1, 1] = bad
    with pytest.raises(CodecError, match="finite values"):
        encode(Message("update", 0, "d", "m", {"w": w}))


@pytest.mark.parametrize("change", [
    {"kind": "weights"}, {"round": -1}, {"round": 2**32}, {"sender": "x" * 256},
    {"method": ""}, {"method": "tópk"}, {"meta": {"x": float("nan")}},
    {"meta": {"x": np.ones(2)}}, {"meta": {"x": np.float32("inf")}}, {"tensors": {"w": np.ones(2)}},
    {"tensors": {"": np.ones(2, np.float32)}}, {"tensors": {"w": [1.0]}},
])
def test_encode_refuses_what_the_format_cannot_carry(change):
    msg = dataclasses.replace(small_message(), **change)
    with pytest.raises(CodecError):
        encode(msg)


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ConfigError):
        encode(small_message(), "csr-bz2")
    with pytest.raises(ConfigError):
        Encoding(index="int16")


# ------------------------------------------------------------------ hostile input
def test_corruption_is_caught_by_the_crc():
    data = bytearray(encode(small_message()))
    data[60] ^= 0x10
    with pytest.raises(CodecError, match="checksum"):
        decode(data)


@given(data=st.data())
def test_truncations_and_bit_flips_raise_codec_error(data):
    msg_bytes = encode(small_message(), data.draw(st.sampled_from(sorted(ENCODINGS))))
    cut = data.draw(st.integers(0, len(msg_bytes) - 1))
    with pytest.raises(CodecError):
        decode(msg_bytes[:cut])
    flipped = bytearray(msg_bytes)
    flipped[data.draw(st.integers(0, len(msg_bytes) - 1))] ^= 1 << data.draw(
        st.integers(0, 7))
    with pytest.raises(CodecError):
        decode(flipped)


@given(data=st.data())
def test_forged_bytes_with_a_valid_crc_raise_only_codec_error(data):
    enc = data.draw(st.sampled_from(sorted(ENCODINGS)))
    good = encode(small_message(), enc)
    forged = bytearray(good[:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        forged[data.draw(st.integers(0, len(forged) - 1))] = data.draw(
            st.integers(0, 255))
    forged += struct.pack("<I", zlib.crc32(forged))
    try:
        back = decode(forged)
    except CodecError:
        return
    # a change the format cannot detect (a value byte, a name) still decodes cleanly
    assert all(np.isfinite(a).all() for a in back.tensors.values()
               if a.dtype == np.float32)


@given(junk=st.binary(max_size=200))
def test_random_bytes_raise_codec_error(junk):
    with pytest.raises(CodecError):
        decode(junk)
    with pytest.raises(CodecError):
        decode(b"SFPP\x01\x00" + junk)


def test_hand_built_frame_decodes():
    back = decode(frame(entries=SMALL_ENTRIES, body=SMALL_BODY))
    assert_same_tensors(back.tensors, small_message().tensors)


NAN_BODY = struct.pack("<2f", 1.5, float("nan")) + W_BODY[8:]
FORGED = {
    "magic": ({"magic": b"SFPQ"}, "magic"),
    "version": ({"version": 2}, r"expected one of \(1,\), got 2"),
    "flags": ({"flags": 1}, "flags"),
    "kind": ({"kind": 2}, "kind"),
    "sender utf-8": ({"sender": b"\xff\xfe"}, "utf-8"),
    "method empty": ({"method": b""}, "method"),
    "meta not JSON": ({"meta": b"{x"}, "JSON"),
    "meta not object": ({"meta": b"[1]"}, "JSON object"),
    "meta NaN": ({"meta": b'{"a":NaN}'}, "JSON"),
    "meta inf": ({"meta": b'{"a":1e999}'}, "JSON"),
    "meta deep": ({"meta": b"[" * 100000}, "JSON"),
    "count too big": ({"count": 4}, "expected"),
    "count huge": ({"count": 2**32 - 1}, "expected"),
    "stored short": ({"stored": 10}, "expected"),
    "stored huge": ({"stored": 2**63}, "truncated"),
    "trailing": ({"trailing": b"\x00"}, "extra bytes"),
    "compression code": ({"compression": 7}, "compression"),
    "zlib garbage": ({"compression": 1}, "zlib"),
    "xz garbage": ({"compression": 2}, "xz"),
    "nan value": ({"body": NAN_BODY + SMALL_BODY[14:]}, "finite values"),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_header_fields_are_refused(name):
    fields, match = FORGED[name]
    kwargs = {"entries": SMALL_ENTRIES, "body": SMALL_BODY, **fields}
    with pytest.raises(CodecError, match=match):
        decode(frame(**kwargs))


BAD_ENTRIES = {
    "dtype code": (entry(dtype=3), "dtype"),
    "ndim 9": (entry(shape=(1,) * 9), "ndim"),
    "layout code": (entry(layout=2), "code set"),
    "csr of int64": (entry(dtype=2), "code set"),
    "csr of 1-D": (entry(shape=(12,)), "code set"),
    "dense with index": (entry(layout=0, value=1, nnz=12, nbytes=48), "code set"),
    "index code": (entry(index=5), "code set"),
    "f16 int64": (entry(b"n", 2, (), 0, 0, 0, 2, 1, 2), "code set"),
    "nnz > size": (entry(nnz=13), "code set"),
    "nnz vs body": (entry(nnz=3), "body bytes"),
    "body length": (entry(nbytes=15), "body bytes"),
    "dense nnz": (entry(b"b", 1, (3,), 0, 0, 0, 1, 2, 8), "nnz"),
}


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
def test_forged_tensor_entries_are_refused(name):
    bad, match = BAD_ENTRIES[name]
    with pytest.raises(CodecError, match=match):
        decode(frame(entries=(bad,) + SMALL_ENTRIES[1:], body=SMALL_BODY))


BAD_BODIES = {
    "column out of range": (bytes([1, 3]) + bytes([1, 0, 0, 1]), "column indices"),
    "counts sum": (bytes([1, 2]) + bytes([1, 0, 0, 0]), "summing to nnz"),
    "count > cols": (bytes([1, 2]) + bytes([4, 0, 0, 0]), "row counts"),
    "unsorted": (bytes([2, 1]) + bytes([2, 0, 0, 0]), "increasing"),
    "duplicate": (bytes([1, 1]) + bytes([2, 0, 0, 0]), "increasing"),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_forged_csr_bodies_are_refused(name):
    tail, match = BAD_BODIES[name]
    body = W_BODY[:8] + tail + SMALL_BODY[14:]
    with pytest.raises(CodecError, match=match):
        decode(frame(entries=SMALL_ENTRIES, body=body))


def test_int32_row_pointers_are_validated():
    w_entry = entry(index=4, row=4, nbytes=36)
    for pointers, match in [((0, 1, 1, 1, 3), "0 to nnz"), ((0, 2, 1, 1, 2), "row")]:
        body = W_BODY[:8] + struct.pack("<2i", 1, 2) + struct.pack("<5i", *pointers)
        with pytest.raises(CodecError, match=match):
            decode(frame(entries=(w_entry,), body=body))
    body = W_BODY[:8] + struct.pack("<2i", 1, -1) + struct.pack("<5i", 0, 1, 1, 1, 2)
    with pytest.raises(CodecError, match="column indices"):
        decode(frame(entries=(w_entry,), body=body))


def test_duplicate_names_are_refused():
    entries = (SMALL_ENTRIES[1], SMALL_ENTRIES[1])
    with pytest.raises(CodecError, match="unique"):
        decode(frame(entries=entries, body=struct.pack("<6f", *range(6))))


@pytest.mark.parametrize("bad", [
    entry(b"x", 1, (2**16, 2**16), 0, 0, 0, 1, 2**32 % 2**32, 2**34),  # > 2**31
    entry(b"x", 1, (2**15, 2**15), 0, 0, 0, 1, 2**30, 2**32),  # over the budget
    entry(b"x", 1, (2**15, 2**12), 1, 3, 1, 1, 0, 2**15),  # empty CSR, 512 MiB dense
    entry(b"x", 1, (2**32 - 1, 0), 1, 3, 1, 1, 0, 2**32 - 1),  # rows over budget
])
def test_forged_huge_shapes_are_refused_fast_without_allocating(bad):
    data = frame(entries=(bad,), body=b"")
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CodecError):
        decode(data, max_elements=2**27 - 1)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20


def test_declared_body_larger_than_the_buffer_is_refused_without_allocating():
    data = frame(entries=(entry(b"x", 1, (2**30,), 0, 0, 0, 1, 2**30, 2**32),),
                 body=b"")
    tracemalloc.start()
    with pytest.raises(CodecError, match="expected 4294967296 bytes"):
        decode(data, max_elements=2**31)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_zip_bomb_is_cut_at_the_declared_size():
    stream = zlib.compress(bytes(8 << 20), 9)
    data = frame(entries=(entry(b"x", 1, (1000,), 0, 0, 0, 1, 1000, 4000),),
                 compression=1, body=stream)
    tracemalloc.start()
    with pytest.raises(CodecError, match="zlib stream of 4000 bytes .the tensor "
                                         "table., got more"):
        decode(data)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20  # the buffer and one piece
    tracemalloc.stop()


def test_xz_dictionary_larger_than_the_declared_body_is_refused():
    # this encoder's dictionary for 8 MiB of zeros is 8 MiB: 4000 bytes never need it
    data = frame(entries=(entry(b"x", 1, (1000,), 0, 0, 0, 1, 1000, 4000),),
                 compression=2, body=codec._compress(bytes(8 << 20), 2))
    tracemalloc.start()
    with pytest.raises(CodecError, match="valid xz stream, got .*[Mm]emory"):
        decode(data)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_xz_dictionary_over_the_memory_limit_is_refused(monkeypatch):
    w = np.random.default_rng(0).integers(1, 4, (256, 1024)).astype(np.float32)
    data = encode(Message("model", 0, "s", "fedavg", {"w": w}), "csr-lzma")
    assert len(data) < w.nbytes // 2  # compressed with a 1 MiB dictionary
    assert decode(data).tensors["w"].shape == w.shape
    monkeypatch.setattr(inflate, "LZMA_MEMLIMIT", 256 << 10)  # read where it inflates
    with pytest.raises(CodecError, match="xz"):
        decode(data)


def test_max_bytes_caps_the_input():
    data = encode(small_message())
    assert decode(data, max_bytes=len(data)).round == 3
    with pytest.raises(CodecError, match=f"expected <= {len(data) - 1} bytes"):
        decode(data, max_bytes=len(data) - 1)


def test_non_bytes_input_is_a_codec_error():
    with pytest.raises(CodecError):
        decode("SFPP")  # type: ignore[arg-type]
