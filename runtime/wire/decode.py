"""``decode``: bytes to a checked ``Message``; trusts nothing (layout, order of the
checks and limits in ``codec``). Any violation raises CodecError, never
IndexError/struct.error/MemoryError.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError, ConfigError
from .checks import CheckedTensors
from .format import (
    CODES,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_RATIO,
    DTYPES,
    F32,
    INDEX,
    KINDS,
    MAGIC,
    MAX_META_BYTES,
    MAX_METHOD_BYTES,
    MAX_NDIM,
    MAX_TENSOR_ELEMENTS,
    PREFIX,
    RATIO_FLOOR,
    SUPPORTED_VERSIONS,
    TAIL,
    TYPE,
    U32,
    U8,
    VALUES,
    VERSION,
    Message,
    Spec,
    max_encoded_size,
    model_spec,
)
from .inflate import inflate_body


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple
    is_csr: bool
    icode: int
    rcode: int
    vtype: np.dtype
    nnz: int
    nbytes: int


class _Reader:
    """Bounds-checked cursor over a memoryview."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> memoryview:
        left = len(self.buf) - self.pos
        if n > left:
            raise CodecError(f"{what}: expected {n} bytes at offset {self.pos}, got "
                             f"{left}; the message is truncated or a length is forged")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def text(self, n: int, what: str) -> str:
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError as err:
            raise CodecError(f"{what}: expected utf-8, got {err}") from err



def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None,
           max_elements: int = DEFAULT_MAX_ELEMENTS, like: Mapping | None = None,
           exact: bool = False, max_ratio: float = DEFAULT_MAX_RATIO) -> Message:
    """Parse and validate one message; the inverse of ``encode``.

    Parameters
    ----------
    data : bytes-like
        One whole message, exactly (trailing bytes are an error).
    max_bytes : int, optional
        Refuse inputs longer than this before looking at them.
    max_elements : int
        Budget for all decoded tensors together (elements, plus the row count of
        each CSR tensor); a forged shape over it is refused before allocating.
    like : mapping, optional
        The announced model (name -> array or (dtype, shape), see ``model_spec``).
        Each tensor entry must then name a tensor of it with the same dtype and
        shape, checked as the entry is read, before any body is touched; at most
        ``len(like)`` tensors; the input at most ``max_encoded_size(like)`` bytes.
    exact : bool
        With ``like``: require exactly its names (an update or a global model).
    max_ratio : float
        A compressed body may declare at most this many raw bytes per stored byte
        (bodies up to ``RATIO_FLOOR`` raw bytes excepted), checked before and while
        inflating.

    Returns
    -------
    Message whose tensors are dense float32/int64 arrays of the encoded shapes, as
    ``CheckedTensors`` (their float values are finite: later checks need not scan).
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError as err:
        raise CodecError(f"message: expected bytes, got {type(data).__name__}") from err
    if max_bytes is not None and len(buf) > max_bytes:
        raise CodecError(f"message size: expected <= {max_bytes} bytes, got "
                         f"{len(buf)}; raise max_bytes or chunk the payload")
    spec = None if like is None else model_spec(like)
    if spec is not None and len(buf) > (limit := max_encoded_size(spec)):
        raise CodecError(f"message size: expected <= {limit} bytes for the announced "
                         f"model ({len(spec)} tensors), got {len(buf)}")
    if exact and like is None:
        raise ConfigError("decode exact=True: expected a model to match, got like=None")
    if not max_ratio >= 1:
        raise ConfigError(f"decode max_ratio: expected a number >= 1, got {max_ratio!r}")
    if len(buf) < PREFIX.size + 4 or bytes(buf[:4]) != MAGIC:
        raise CodecError(f"message magic: expected {MAGIC!r} and >= "
                         f"{PREFIX.size + 4} bytes, got {bytes(buf[:4])!r} and "
                         f"{len(buf)} bytes; not a SparseFedPP message")
    version = PREFIX.unpack_from(buf)[1]
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(f"message version: expected one of {SUPPORTED_VERSIONS}, "
                         f"got {version}; upgrade this side or re-encode with "
                         f"version {VERSION}")
    want, got = U32.unpack_from(buf, len(buf) - 4)[0], zlib.crc32(buf[:-4])
    if want != got:
        raise CodecError(f"message checksum: expected CRC32 {want:#010x}, got "
                         f"{got:#010x}; the message was corrupted or truncated")
    reader = _Reader(buf[:-4])
    kind, rnd, num_examples, sender, method, meta = _decode_header(reader)
    entries = _decode_table(reader, max_elements, spec, exact)
    body = _decode_body(reader, sum(e.nbytes for e in entries), max_ratio)
    tensors, offset = {}, 0
    for entry in entries:
        tensors[entry.name] = _decode_tensor(entry, body[offset:offset + entry.nbytes])
        offset += entry.nbytes
    return Message(kind, rnd, sender, method, CheckedTensors(tensors), num_examples,
                   meta)


def _body_sizes(data: bytes) -> tuple[int, int, int]:
    """(compression code, declared raw body, stored body) without inflating; for
    the measurements of tools/bench/codec_limits.py and the tests."""
    reader = _Reader(memoryview(data).cast("B")[:-4])
    _decode_header(reader)
    raw = sum(e.nbytes for e in _decode_table(reader, MAX_TENSOR_ELEMENTS, None, False))
    code, stored = reader.unpack(TAIL, "compression header")
    return code, raw, stored


def _decode_table(reader: _Reader, max_elements: int, spec: Spec | None,
                  exact: bool) -> list[_Entry]:
    """The tensor entries, each checked against the budget and ``spec`` as read."""
    (count,) = reader.unpack(U32, "tensor count")
    if spec is not None and (count > len(spec) or exact and count != len(spec)):
        raise CodecError(f"tensor count: expected {'' if exact else '<= '}"
                         f"{len(spec)} (the announced model), got {count}")
    entries, seen, budget = [], set(), 0
    for i in range(count):
        entry = _decode_entry(reader, i)
        if entry.name in seen:
            raise CodecError(f"tensor {entry.name!r}: expected unique names, got it "
                             f"twice")
        seen.add(entry.name)
        if spec is not None:
            _check_like(entry, spec)
        budget += math.prod(entry.shape) + (entry.shape[0] if entry.is_csr else 0)
        if budget > max_elements:
            raise CodecError(f"tensor {entry.name!r}: expected <= {max_elements} "
                             f"decoded elements in total, got {budget} so far; "
                             f"raise max_elements if this model is real")
        entries.append(entry)
    return entries


def _check_like(entry: _Entry, spec: Spec) -> None:
    if entry.name not in spec:
        known = ", ".join(repr(n) for n in list(spec)[:3])
        raise CodecError(f"tensor {entry.name!r}: expected a tensor of the announced "
                         f"model ({known}, ...), got an unknown name")
    dtype, shape = spec[entry.name]
    if (entry.dtype, entry.shape) != (dtype, shape):
        raise CodecError(f"tensor {entry.name!r}: expected {dtype} {shape} as in the "
                         f"announced model, got {entry.dtype} {entry.shape}")


def _decode_header(reader: _Reader) -> tuple:
    _, _, flags, kind, rnd, num_examples = reader.unpack(PREFIX, "message header")
    if flags != 0:
        raise CodecError(f"message flags: expected 0, got {flags:#04x}; written by a "
                         f"newer encoder")
    if kind >= len(KINDS):
        raise CodecError(f"message kind: expected 0 (model) or 1 (update), got {kind}")
    sender = reader.text(reader.unpack(U8, "sender length")[0], "message sender")
    method = reader.text(reader.unpack(U8, "method length")[0], "message method")
    if not (method.isascii() and method.isprintable()) or \
            not 0 < len(method) <= MAX_METHOD_BYTES:
        raise CodecError(f"message method: expected 1..{MAX_METHOD_BYTES} printable "
                         f"ascii characters, got {method[:80]!r}")
    (size,) = reader.unpack(U32, "meta length")
    if size > MAX_META_BYTES:
        raise CodecError(f"message meta: expected <= {MAX_META_BYTES} bytes, got {size}")
    text = reader.text(size, "message meta")
    try:
        meta = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as err:
        raise CodecError(f"message meta: expected a JSON object, got {err}") from err
    if not isinstance(meta, dict):
        raise CodecError(f"message meta: expected a JSON object, got "
                         f"{type(meta).__name__}")
    return KINDS[kind], rnd, num_examples, sender, method, meta


def _no_constant(name: str):
    raise ValueError(f"non-finite constant {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


def _decode_entry(reader: _Reader, i: int) -> _Entry:
    name = reader.text(reader.unpack(U8, f"tensor {i} name length")[0],
                       f"tensor {i} name")
    what = f"tensor {name!r}"
    dcode, ndim = reader.unpack(TYPE, f"{what} dtype")
    if dcode not in DTYPES or ndim > MAX_NDIM or not name:
        raise CodecError(f"{what}: expected a name, dtype code 1|2 and ndim <= "
                         f"{MAX_NDIM}, got dtype {dcode}, ndim {ndim}")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"{what} shape"))
    size = math.prod(shape)
    if size > MAX_TENSOR_ELEMENTS:
        raise CodecError(f"{what}: expected <= {MAX_TENSOR_ELEMENTS} elements, got "
                         f"shape {shape}")
    layout, icode, rcode, vcode, nnz, nbytes = reader.unpack(CODES, f"{what} codes")
    dtype, vtype = DTYPES[dcode], VALUES.get(vcode)
    allowed = (1, 2) if dtype == F32 else (3,)
    if layout == 0 and (icode, rcode) == (0, 0) and vcode in allowed:
        expected = (size, size * vtype.itemsize)
    elif layout == 1 and dtype == F32 and ndim >= 2 and icode in INDEX \
            and rcode in INDEX and vcode in allowed and nnz <= size \
            and shape[0] <= MAX_TENSOR_ELEMENTS:
        rows = shape[0] + (rcode == 4)
        expected = (nnz, nnz * (vtype.itemsize + INDEX[icode].itemsize)
                    + rows * INDEX[rcode].itemsize)
    else:
        raise CodecError(f"{what}: expected a valid (layout, index, row, value) code "
                         f"set for {dtype} shape {shape}, got ({layout}, {icode}, "
                         f"{rcode}, {vcode}) with nnz {nnz}")
    if (nnz, nbytes) != expected:
        raise CodecError(f"{what}: expected nnz {expected[0]} and {expected[1]} body "
                         f"bytes, got nnz {nnz} and {nbytes} bytes")
    return _Entry(name, dtype, shape, layout == 1, icode, rcode, vtype, nnz, nbytes)


def _decode_body(reader: _Reader, raw_size: int, max_ratio: float) -> memoryview:
    code, stored = reader.unpack(TAIL, "compression header")
    body = reader.take(stored, "message body")
    if reader.pos != len(reader.buf):
        raise CodecError(f"message: expected to end after the body at offset "
                         f"{reader.pos}, got {len(reader.buf) - reader.pos} extra "
                         f"bytes before the checksum")
    if code == 0:
        if stored != raw_size:
            raise CodecError(f"message body: expected {raw_size} bytes (sum of the "
                             f"tensor table), got {stored}")
        return body
    if code not in (1, 2):
        raise CodecError(f"message compression: expected 0|1|2, got {code}")
    if raw_size > max(RATIO_FLOOR, max_ratio * stored):
        raise CodecError(f"message body: expected <= {max_ratio:g} raw bytes per "
                         f"stored byte, got {raw_size} declared from {stored} "
                         f"({raw_size / max(stored, 1):.0f}x); a compression bomb, "
                         f"or raise max_ratio")
    return memoryview(inflate_body(body, code, raw_size, max_ratio))


def _decode_tensor(entry: _Entry, body: memoryview) -> np.ndarray:
    what = f"tensor {entry.name!r}"
    values = np.frombuffer(body, dtype=entry.vtype, count=entry.nnz)
    values = values.astype(entry.dtype)
    if entry.dtype == F32 and not np.isfinite(values).all():
        raise CodecError(f"{what}: expected finite values, got NaN or inf")
    if not entry.is_csr:
        return values.reshape(entry.shape)
    rows, cols = entry.shape[0], math.prod(entry.shape[1:])
    off = values.size * entry.vtype.itemsize
    indices = np.frombuffer(body, dtype=INDEX[entry.icode], count=entry.nnz,
                            offset=off).astype(np.int64)
    off += indices.size * INDEX[entry.icode].itemsize
    row_part = np.frombuffer(body, dtype=INDEX[entry.rcode], offset=off)
    counts = _row_counts(row_part.astype(np.int64), entry, what)
    if entry.nnz and (indices.min() < 0 or indices.max() >= cols):
        raise CodecError(f"{what}: expected column indices in [0, {cols}), got "
                         f"{indices.min()}..{indices.max()}")
    starts = np.zeros(entry.nnz, dtype=bool)
    starts[(np.cumsum(counts) - counts)[counts > 0]] = True
    if np.any((np.diff(indices) <= 0) & ~starts[1:]):
        raise CodecError(f"{what}: expected strictly increasing column indices "
                         f"within each row, got a repeat or a decrease")
    dense = np.zeros(rows * cols, dtype=np.float32)
    dense[np.repeat(np.arange(rows, dtype=np.int64) * cols, counts) + indices] = values
    return dense.reshape(entry.shape)


def _row_counts(row_part: np.ndarray, entry: _Entry, what: str) -> np.ndarray:
    """Counts per row from counts (rcode 1..3) or i32 pointers (rcode 4), checked."""
    if entry.rcode == 4:
        if row_part[0] != 0 or row_part[-1] != entry.nnz:
            raise CodecError(f"{what}: expected row pointers from 0 to nnz="
                             f"{entry.nnz}, got {row_part[0]}..{row_part[-1]}")
        counts = np.diff(row_part)
    else:
        counts = row_part
    cols = math.prod(entry.shape[1:])
    if counts.size and (counts.min() < 0 or counts.max() > cols):
        raise CodecError(f"{what}: expected row counts in [0, {cols}] (pointers "
                         f"non-decreasing), got {counts.min()}..{counts.max()}")
    if int(counts.sum()) != entry.nnz:
        raise CodecError(f"{what}: expected row counts summing to nnz={entry.nnz}, "
                         f"got {int(counts.sum())}")
    return counts
