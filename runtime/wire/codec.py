"""Wire codec for models and updates: ``encode(Message) -> bytes``, ``decode(bytes)``.

One symmetric pair, no pickle and no ``np.save`` (a pickle on the wire runs code on
load; Flower's ``parameter.py`` says the same). ``decode`` trusts nothing: every
length, code, shape, index and value is checked and any violation raises
``CodecError``, never ``IndexError``/``struct.error``/``MemoryError``.

Tensors: float32 (any shape) or int64 (e.g. ``num_batches_tracked``). A float32
tensor with ndim >= 2 may travel as CSR of its 2-D view rows x cols, rows =
shape[0], cols = prod(shape[1:]) (a conv weight (O, C, kh, kw) is O x C*kh*kw, as
``sparse.to_csr``); 1-D, 0-D and int64 tensors always travel dense. ``decode``
returns dense, writable, C-contiguous arrays of the original shapes and dtypes,
bit-exact for f32 values (except that a ``-0.0`` sent as CSR comes back ``+0.0``).

Binary layout, version 1. All integers little-endian, unsigned unless noted::

    offset  size  field
    0       4     magic  b"SFPP"
    4       2     u16 format version (1)
    6       1     u8  flags, reserved: must be 0
    7       1     u8  kind: 0 "model" (server -> device), 1 "update" (device -> server)
    8       4     u32 round
    12      8     u64 num_examples
    20      1     u8  S, sender length;      then S bytes utf-8 sender (may be empty)
            1     u8  M, method length;      then M bytes printable ascii (1..64)
            4     u32 J, meta length;        then J bytes utf-8 JSON object (<= 1 MiB)
            4     u32 T, tensor count;       then T tensor entries:
                    1      u8  N, name length (1..255); then N bytes utf-8 name
                    1      u8  dtype: 1 float32, 2 int64
                    1      u8  ndim (0..8)
                    4*ndim u32 shape
                    1      u8  layout: 0 dense, 1 CSR
                    1      u8  column index type: 0 none (dense), 1 u8, 2 u16, 3 u32,
                               4 i32
                    1      u8  row type: 0 none (dense), 1 u8 / 2 u16 / 3 u32 counts
                               per row (rows entries), 4 i32 row pointers (rows + 1)
                    1      u8  value type: 1 f32, 2 f16, 3 i64
                    4      u32 nnz: number of stored values (dense: prod(shape))
                    8      u64 B, byte length of this tensor's body
            1     u8  compression: 0 none, 1 zlib (RFC 1950), 2 xz (check NONE)
            8     u64 C, stored body length
            C     body: the T tensor bodies back to back (sum of B bytes), compressed
                  as one stream when compression != 0
            4     u32 CRC32 (zlib.crc32) of every byte before it

A tensor body: dense = prod(shape) values; CSR = nnz values, then nnz column
indices (strictly increasing within a row), then the row part (counts summing to
nnz, or i32 pointers from 0 to nnz, non-decreasing), each in the entry's types.
Fixed overhead is 43 bytes, plus S + M + J, plus 19 + N + 4*ndim per tensor, plus
C. This encoder writes zlib at level 9 and xz as LZMA2 preset 6 with a dictionary
of min(max(raw body, 4 KiB), 8 MiB); any conforming stream within the limits
below decodes.

Decode order and limits (decoder policy; the bytes above are the format): size <=
``max_bytes`` and, given the announced model ``like``, <= ``max_encoded_size(like)``;
magic, version, CRC32, then the fields in order. A tensor has <= 2**31 - 1 elements
and <= 8 dims; all tensors together (elements, plus rows of each CSR tensor) stay
within ``max_elements`` (default 2**27); each B must equal the size implied by
shape, nnz and codes. With ``like``, T <= len(like) (== with ``exact``) is checked
as soon as T is read, and each entry, as soon as it is read, must name a tensor of
``like`` with its dtype and shape: elements, index rows and the raw body are then
bounded by the model, all before any body is touched or anything allocated.

A compressed body must declare at most ``max_ratio`` (default 32) raw bytes per
stored byte, unless its raw size is <= 1 MiB (``RATIO_FLOOR``); this is checked
before inflating, then again while inflating: the stream goes, 64 KiB of input and
<= 256 KiB of output at a time, into a buffer of exactly the declared size, and
stops at the first byte past it, at the first point where the output exceeds
max(1 MiB, max_ratio x the input fed so far), or at the first stream error. So a
bomb costs at most max(1 MiB, max_ratio x its stored size) plus one piece, and xz
at most declared size + 1 MiB more of dictionary (memory limit min(64 MiB,
declared + 1 MiB): this encoder sizes the dictionary to the data).

Measured raw/stored ratios of real encodings (tools/bench_codec_limits.py ratios:
cnn, resnet8, resnet18 at sparsity 0, 0.9, 0.99, 0.999; fresh, with trained-like
BatchNorm, and after 3 SGD steps; every preset). Uncompressed presets: 1. zlib/xz
presets: 1.08-1.17 at sparsity 0, at most 1.85 at 0.9 and 0.99; the worst are
fresh nets at 0.999, whose BatchNorm (weight 1, bias 0, mean 0, var 1) is nearly
free: ResNet-8 11.2 (a 6 KB body, under the floor), ResNet-18 3.1. Over the floor
the worst is 1.85 (ResNet-18, 0.9, csr-f16-lzma; 1.98 while inflating, where the
running ratio runs at most 0.14 above the final one). The default 32 is ~3x the
worst preset overall and ~16x the worst body over the floor. Encodings that are
not presets go far higher: a pruned net laid out dense, then compressed, reaches
9.6 at 0.9 and 776 at 0.999 (ResNet-18, dense + xz); decode those with a larger
``max_ratio``.

Encoding presets (``ENCODINGS``): "dense"; "csr32" (int32 indices and pointers);
"csr" (narrow: u8/u16/u32 column indices by column count, row counts in the
narrowest type that fits the longest row); "csr-f16"; "csr-zlib"; "csr-lzma";
"csr-f16-lzma". CSR presets use ``sparse="auto"``: a tensor goes CSR only when its
uncompressed CSR body is strictly smaller than its dense body. ``values="f16"``
applies to every float32 tensor, dense ones included. A compressed body that is
not smaller than the raw one is stored raw (compression code 0).
"""

from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import CodecError, ConfigError

MAGIC = b"SFPP"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 2**31 - 1
DEFAULT_MAX_ELEMENTS = 2**27  # decoded budget: 512 MiB of float32 (ResNet-18: 11 M)
MAX_META_BYTES = 1 << 20
MAX_METHOD_BYTES = 64
LZMA_MEMLIMIT = 64 << 20  # a forged xz header may ask for a huge dictionary
LZMA_OVERHEAD = 1 << 20  # xz decoder memory beyond its dictionary, with room
DEFAULT_MAX_RATIO = 32.0  # raw / stored body; measured in the module docstring
RATIO_FLOOR = 1 << 20  # raw bodies up to this size are never refused for ratio
INFLATE_PIECE = 256 << 10  # output per decompress call
INFLATE_INPUT_PIECE = 64 << 10  # input per feed
_FIXED_BYTES = 43  # header + tail + CRC of a message without strings and tensors
_ENTRY_BYTES = 19  # a tensor entry without its name and shape

KINDS = ("model", "update")
_F32, _F16, _I64 = np.dtype("<f4"), np.dtype("<f2"), np.dtype("<i8")
_DTYPES = {1: _F32, 2: _I64}
_VALUES = {1: _F32, 2: _F16, 3: _I64}
_INDEX = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("<i4")}
_COMPRESS = {"none": 0, "zlib": 1, "lzma": 2}

_PREFIX = struct.Struct("<4sHBBIQ")  # magic, version, flags, kind, round, num_examples
_TYPE = struct.Struct("<BB")  # dtype, ndim
_CODES = struct.Struct("<BBBBIQ")  # layout, index, row, value, nnz, body length
_TAIL = struct.Struct("<BQ")  # compression, stored body length
_U8, _U32 = struct.Struct("<B"), struct.Struct("<I")


@dataclass(frozen=True, eq=False)
class Message:
    """One model (server -> device) or update (device -> server) on the wire.

    ``tensors`` maps state-dict names to float32 (any shape) or int64 arrays;
    ``num_examples`` is the FedAvg weight of an update; ``meta`` holds small
    JSON-serialisable extras. ``eq=False``: ``==`` on dicts of arrays is ambiguous.
    """

    kind: str
    round: int
    sender: str
    method: str
    tensors: dict[str, np.ndarray]
    num_examples: int = 0
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Encoding:
    """How tensors are laid out: sparse in {"dense", "csr", "auto"}, index in
    {"int32", "narrow"}, values in {"f32", "f16"}, compress in {"none", "zlib",
    "lzma"} (see the module docstring)."""

    sparse: str = "auto"
    index: str = "narrow"
    values: str = "f32"
    compress: str = "none"

    def __post_init__(self):
        allowed = {"sparse": ("dense", "csr", "auto"), "index": ("int32", "narrow"),
                   "values": ("f32", "f16"), "compress": tuple(_COMPRESS)}
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ConfigError(f"Encoding.{name}: expected one of {options}, got "
                                  f"{getattr(self, name)!r}")


ENCODINGS: dict[str, Encoding] = {
    "dense": Encoding(sparse="dense"),
    "csr32": Encoding(index="int32"),
    "csr": Encoding(),
    "csr-f16": Encoding(values="f16"),
    "csr-zlib": Encoding(compress="zlib"),
    "csr-lzma": Encoding(compress="lzma"),
    "csr-f16-lzma": Encoding(values="f16", compress="lzma"),
}


# ------------------------------------------------------------------------ encode
def encode(msg: Message, encoding: Encoding | str = "csr") -> bytes:
    """Serialise ``msg``; ``encoding`` is an ``Encoding`` or a name in ``ENCODINGS``.

    Raises CodecError for content the format cannot carry (wrong dtype, NaN/inf,
    f16 overflow, over-long strings, non-JSON meta) and ConfigError for an unknown
    encoding. ``len(result)`` is the exact number of bytes that cross the wire.
    """
    enc = _resolve(encoding)
    head = [_encode_header(msg)]
    bodies = []
    _check_names(msg.tensors)
    for name, arr in msg.tensors.items():
        entry, chunks = _encode_tensor(name, arr, enc)
        head.append(entry)
        bodies.extend(chunks)
    raw = b"".join(bodies)
    code = _COMPRESS[enc.compress]
    body = _compress(raw, code)
    if len(body) >= len(raw):
        code, body = 0, raw
    head.append(_TAIL.pack(code, len(body)))
    out = b"".join(head) + body
    return out + _U32.pack(zlib.crc32(out))


def encoded_size(msg: Message, encoding: Encoding | str = "csr") -> int:
    """``len(encode(msg, encoding))``: the exact wire size in bytes."""
    return len(encode(msg, encoding))


def _resolve(encoding: Encoding | str) -> Encoding:
    if isinstance(encoding, Encoding):
        return encoding
    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding: expected an Encoding or one of "
                          f"{sorted(ENCODINGS)}, got {encoding!r}")
    return ENCODINGS[encoding]


def _short(text, what: str, *, limit: int, ascii_only: bool = False,
           allow_empty: bool = True) -> bytes:
    if not isinstance(text, str):
        raise CodecError(f"{what}: expected a str, got {type(text).__name__}")
    raw = text.encode("ascii" if ascii_only else "utf-8", errors="replace")
    if (ascii_only and not (text.isascii() and text.isprintable())) or \
            len(raw) > limit or (not raw and not allow_empty):
        kind = "printable ascii" if ascii_only else "utf-8"
        raise CodecError(f"{what}: expected {1 - allow_empty}..{limit} bytes of "
                         f"{kind}, got {text[:80]!r} ({len(raw)} bytes)")
    return raw


def _uint(value, what: str, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < 2**bits:
        raise CodecError(f"{what}: expected an int in [0, 2**{bits}), got {value!r}")
    return int(value)


def _encode_header(msg: Message) -> bytes:
    if msg.kind not in KINDS:
        raise CodecError(f"message kind: expected one of {KINDS}, got {msg.kind!r}")
    sender = _short(msg.sender, "message sender", limit=255)
    method = _short(msg.method, "message method", limit=MAX_METHOD_BYTES,
                    ascii_only=True, allow_empty=False)
    if not isinstance(msg.meta, dict):
        raise CodecError(f"message meta: expected a dict, got {type(msg.meta).__name__}")
    try:
        meta = json.dumps(msg.meta, sort_keys=True, separators=(",", ":"),
                          allow_nan=False, ensure_ascii=False,
                          default=_numpy_scalar).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise CodecError(f"message meta: expected JSON-serialisable finite values, "
                         f"got {err}; send arrays as tensors") from err
    if len(meta) > MAX_META_BYTES:
        raise CodecError(f"message meta: expected <= {MAX_META_BYTES} bytes of JSON, "
                         f"got {len(meta)}; send large data as tensors")
    if not isinstance(msg.tensors, dict) or len(msg.tensors) >= 2**32:
        raise CodecError(f"message tensors: expected a dict of arrays, got "
                         f"{type(msg.tensors).__name__}")
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, KINDS.index(msg.kind),
                          _uint(msg.round, "message round", 32),
                          _uint(msg.num_examples, "message num_examples", 64))
    return b"".join([prefix, _U8.pack(len(sender)), sender, _U8.pack(len(method)),
                     method, _U32.pack(len(meta)), meta, _U32.pack(len(msg.tensors))])


def _numpy_scalar(value):
    """json.dumps hook: numpy scalars (np.float32 metrics) become Python numbers."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_names(tensors: dict) -> None:
    for name in tensors:
        _short(name, "tensor name", limit=255, allow_empty=False)


def _narrowest(max_value: int) -> int:
    """Code of the narrowest unsigned type (1 u8, 2 u16, 3 u32) holding max_value."""
    return 1 if max_value < 2**8 else 2 if max_value < 2**16 else 3


def _encode_tensor(name: str, arr, enc: Encoding) -> tuple[bytes, list[bytes]]:
    what = f"tensor {name!r}"
    if not isinstance(arr, np.ndarray) or arr.dtype not in (_F32, _I64):
        got = getattr(arr, "dtype", type(arr).__name__)
        raise CodecError(f"{what}: expected a float32 or int64 ndarray, got {got}; "
                         f"use .astype(np.float32)")
    if arr.ndim > MAX_NDIM or arr.size > MAX_TENSOR_ELEMENTS \
            or any(s >= 2**32 for s in arr.shape):
        raise CodecError(f"{what}: expected <= {MAX_NDIM} dims and <= "
                         f"{MAX_TENSOR_ELEMENTS} elements, got shape {arr.shape}")
    dtype_code = 1 if arr.dtype == _F32 else 2
    head = (_U8.pack(len(name.encode("utf-8"))) + name.encode("utf-8")
            + _TYPE.pack(dtype_code, arr.ndim)
            + struct.pack(f"<{arr.ndim}I", *arr.shape))
    if arr.dtype == _I64:
        values = np.ascontiguousarray(arr, dtype=_I64).tobytes()
        return head + _CODES.pack(0, 0, 0, 3, arr.size, len(values)), [values]
    if not np.isfinite(arr).all():
        raise CodecError(f"{what}: expected finite values, got NaN or inf; the "
                         f"update diverged, do not send it")
    vtype = _F16 if enc.values == "f16" else _F32
    vcode = 2 if enc.values == "f16" else 1
    csr = _csr_parts(arr, enc, vtype) if arr.ndim >= 2 and enc.sparse != "dense" \
        else None
    if csr is None:
        values = _as_values(arr.ravel(), vtype, what)
        return head + _CODES.pack(0, 0, 0, vcode, arr.size, len(values)), [values]
    icode, rcode, nnz, parts = csr
    parts[0] = _as_values(parts[0], vtype, what)
    nbytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    chunks = [p if isinstance(p, bytes) else p.tobytes() for p in parts]
    return head + _CODES.pack(1, icode, rcode, vcode, nnz, nbytes), chunks


def _csr_parts(arr: np.ndarray, enc: Encoding, vtype: np.dtype):
    """(index code, row code, nnz, [values, indices, rows]) or None if dense wins."""
    rows, cols = arr.shape[0], math.prod(arr.shape[1:])
    mat = arr.reshape(rows, cols)
    mask = mat != 0
    counts = mask.sum(axis=1)
    nnz = int(counts.sum())
    if enc.index == "int32":
        icode = rcode = 4
        row_part = np.zeros(rows + 1, dtype=_INDEX[4])
        np.cumsum(counts, out=row_part[1:])
    else:
        icode = _narrowest(max(cols - 1, 0))
        rcode = _narrowest(int(counts.max()) if rows else 0)
        row_part = counts.astype(_INDEX[rcode])
    csr_bytes = nnz * (vtype.itemsize + _INDEX[icode].itemsize) + row_part.nbytes
    if enc.sparse == "auto" and csr_bytes >= arr.size * vtype.itemsize:
        return None
    indices = np.nonzero(mask)[1].astype(_INDEX[icode])  # row-major: sorted per row
    return icode, rcode, nnz, [mat[mask], indices, row_part]


def _as_values(values: np.ndarray, vtype: np.dtype, what: str) -> bytes:
    if vtype == _F16:
        with np.errstate(over="ignore"):
            half = values.astype(_F16)
        if not np.isfinite(half).all():
            big = float(np.abs(values).max())
            raise CodecError(f"{what}: expected |values| <= 65504 for f16, got "
                             f"{big:g}; use an f32 encoding")
        return half.tobytes()
    return np.ascontiguousarray(values, dtype=_F32).tobytes()


def _compress(raw: bytes, code: int) -> bytes:
    if code == 1:
        return zlib.compress(raw, 9)
    if code == 2:
        # a dictionary no bigger than the data keeps encoder memory small on a device
        dict_size = min(max(len(raw), 4096), 8 << 20)
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}]
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                             filters=filters)
    return raw


# ------------------------------------------------------------------------ decode
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


Spec = dict[str, tuple[np.dtype, tuple[int, ...]]]


def model_spec(tensors: Mapping) -> Spec:
    """``{name: (dtype, shape)}`` of a state dict, the ``like`` of ``decode``.

    Values may be arrays (anything with ``dtype`` and ``shape``) or ``(dtype,
    shape)`` pairs, so a spec is its own spec. Raises ConfigError for a dtype or
    shape the format cannot carry.
    """
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"like: expected a mapping name -> array or (dtype, shape), "
                          f"got {type(tensors).__name__}")
    spec = {}
    for name, value in tensors.items():
        try:
            dtype, shape = (value.dtype, value.shape) if hasattr(value, "dtype") \
                else value
            dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"like {name!r}: expected an array or (dtype, shape), "
                              f"got {value!r:.80}") from err
        if not isinstance(name, str) or not 0 < len(name.encode("utf-8")) <= 255 \
                or dtype not in (_F32, _I64) or len(shape) > MAX_NDIM \
                or any(not 0 <= s < 2**32 for s in shape) \
                or math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise ConfigError(f"like {name!r}: expected a 1..255-byte name, float32 or "
                              f"int64 and <= {MAX_NDIM} dims, got {dtype} {shape}")
        spec[name] = (dtype, shape)
    return spec


def max_encoded_size(like: Mapping, encoding: Encoding | str | None = None) -> int:
    """Upper bound of ``len(encode(msg, encoding))`` for any message whose tensors
    match ``like`` (any sender, method and meta the format allows).

    ``encoding=None`` bounds every ``Encoding`` (a forced-CSR int32 body of a full
    tensor is twice its dense body); ``decode(..., like=like)`` refuses anything
    longer. A preset gives the tighter bound the aggregator's chunk reassembly can
    use: ``"auto"`` layouts are never larger than dense, and a compressed body
    never larger than the raw one (the encoder stores it raw otherwise).
    """
    spec = model_spec(like)
    enc = None if encoding is None else _resolve(encoding)
    total = _FIXED_BYTES + 255 + MAX_METHOD_BYTES + MAX_META_BYTES
    for name, (dtype, shape) in spec.items():
        total += _ENTRY_BYTES + len(name.encode("utf-8")) + 4 * len(shape)
        size = math.prod(shape)
        if dtype == _I64:
            total += 8 * size
            continue
        value = 2 if enc is not None and enc.values == "f16" else 4
        body = size * (4 if enc is None else value)
        if len(shape) >= 2 and (enc is None or enc.sparse == "csr"):
            rows, cols = shape[0], math.prod(shape[1:])
            if enc is None or enc.index == "int32":
                csr = size * (value + 4) + 4 * (rows + 1)
            else:
                csr = size * (value + _INDEX[_narrowest(max(cols - 1, 0))].itemsize) \
                    + rows * _INDEX[_narrowest(cols)].itemsize
            body = max(body, csr)
        total += body
    return total


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
    Message whose tensors are dense float32/int64 arrays of the encoded shapes.
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
    if len(buf) < _PREFIX.size + 4 or bytes(buf[:4]) != MAGIC:
        raise CodecError(f"message magic: expected {MAGIC!r} and >= "
                         f"{_PREFIX.size + 4} bytes, got {bytes(buf[:4])!r} and "
                         f"{len(buf)} bytes; not a SparseFedPP message")
    version = _PREFIX.unpack_from(buf)[1]
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(f"message version: expected one of {SUPPORTED_VERSIONS}, "
                         f"got {version}; upgrade this side or re-encode with "
                         f"version {VERSION}")
    want, got = _U32.unpack_from(buf, len(buf) - 4)[0], zlib.crc32(buf[:-4])
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
    return Message(kind, rnd, sender, method, tensors, num_examples, meta)


def _body_sizes(data: bytes) -> tuple[int, int, int]:
    """(compression code, declared raw body, stored body) without inflating; for
    the measurements of tools/bench_codec_limits.py and the tests."""
    reader = _Reader(memoryview(data).cast("B")[:-4])
    _decode_header(reader)
    raw = sum(e.nbytes for e in _decode_table(reader, MAX_TENSOR_ELEMENTS, None, False))
    code, stored = reader.unpack(_TAIL, "compression header")
    return code, raw, stored


def _decode_table(reader: _Reader, max_elements: int, spec: Spec | None,
                  exact: bool) -> list[_Entry]:
    """The tensor entries, each checked against the budget and ``spec`` as read."""
    (count,) = reader.unpack(_U32, "tensor count")
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
    _, _, flags, kind, rnd, num_examples = reader.unpack(_PREFIX, "message header")
    if flags != 0:
        raise CodecError(f"message flags: expected 0, got {flags:#04x}; written by a "
                         f"newer encoder")
    if kind >= len(KINDS):
        raise CodecError(f"message kind: expected 0 (model) or 1 (update), got {kind}")
    sender = reader.text(reader.unpack(_U8, "sender length")[0], "message sender")
    method = reader.text(reader.unpack(_U8, "method length")[0], "message method")
    if not (method.isascii() and method.isprintable()) or \
            not 0 < len(method) <= MAX_METHOD_BYTES:
        raise CodecError(f"message method: expected 1..{MAX_METHOD_BYTES} printable "
                         f"ascii characters, got {method[:80]!r}")
    (size,) = reader.unpack(_U32, "meta length")
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
    name = reader.text(reader.unpack(_U8, f"tensor {i} name length")[0],
                       f"tensor {i} name")
    what = f"tensor {name!r}"
    dcode, ndim = reader.unpack(_TYPE, f"{what} dtype")
    if dcode not in _DTYPES or ndim > MAX_NDIM or not name:
        raise CodecError(f"{what}: expected a name, dtype code 1|2 and ndim <= "
                         f"{MAX_NDIM}, got dtype {dcode}, ndim {ndim}")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"{what} shape"))
    size = math.prod(shape)
    if size > MAX_TENSOR_ELEMENTS:
        raise CodecError(f"{what}: expected <= {MAX_TENSOR_ELEMENTS} elements, got "
                         f"shape {shape}")
    layout, icode, rcode, vcode, nnz, nbytes = reader.unpack(_CODES, f"{what} codes")
    dtype, vtype = _DTYPES[dcode], _VALUES.get(vcode)
    allowed = (1, 2) if dtype == _F32 else (3,)
    if layout == 0 and (icode, rcode) == (0, 0) and vcode in allowed:
        expected = (size, size * vtype.itemsize)
    elif layout == 1 and dtype == _F32 and ndim >= 2 and icode in _INDEX \
            and rcode in _INDEX and vcode in allowed and nnz <= size \
            and shape[0] <= MAX_TENSOR_ELEMENTS:
        rows = shape[0] + (rcode == 4)
        expected = (nnz, nnz * (vtype.itemsize + _INDEX[icode].itemsize)
                    + rows * _INDEX[rcode].itemsize)
    else:
        raise CodecError(f"{what}: expected a valid (layout, index, row, value) code "
                         f"set for {dtype} shape {shape}, got ({layout}, {icode}, "
                         f"{rcode}, {vcode}) with nnz {nnz}")
    if (nnz, nbytes) != expected:
        raise CodecError(f"{what}: expected nnz {expected[0]} and {expected[1]} body "
                         f"bytes, got nnz {nnz} and {nbytes} bytes")
    return _Entry(name, dtype, shape, layout == 1, icode, rcode, vtype, nnz, nbytes)


def _decode_body(reader: _Reader, raw_size: int, max_ratio: float) -> memoryview:
    code, stored = reader.unpack(_TAIL, "compression header")
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
    return memoryview(_inflate(body, code, raw_size, max_ratio))


def _inflate(body: memoryview, code: int, raw_size: int, max_ratio: float) -> bytearray:
    """Inflate ``body`` into a buffer of exactly ``raw_size`` bytes, one piece at a
    time (<= INFLATE_PIECE out per call, INFLATE_INPUT_PIECE in per feed), stopping
    at the first byte past ``raw_size``, the first running ratio over ``max_ratio``
    or the first stream error; never holds more than raw_size + one piece."""
    stream = ("zlib", "xz")[code - 1]
    out = bytearray(raw_size)
    view = memoryview(out)
    try:
        if code == 1:
            dec = zlib.decompressobj()
        else:
            # a dictionary larger than the data is never needed (this encoder sizes
            # it to the data); a forged header asking for more is refused up front
            limit = min(LZMA_MEMLIMIT, raw_size + LZMA_OVERHEAD)
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=limit)
        pos = fed = 0
        stalled = False
        while not dec.eof:
            if code == 1 and dec.unconsumed_tail:
                piece = dec.unconsumed_tail
            elif (code == 1 or dec.needs_input) and fed < len(body):
                piece = body[fed:fed + INFLATE_INPUT_PIECE]
                fed += len(piece)
            else:  # no input left (or xz holds some): drain what the decoder has
                piece = b""
            got = dec.decompress(piece, min(INFLATE_PIECE, raw_size - pos + 1))
            if pos + len(got) > raw_size:
                raise CodecError(f"message body: expected a {stream} stream of "
                                 f"{raw_size} bytes (the tensor table), got more")
            view[pos:pos + len(got)] = got
            pos += len(got)
            if pos > max(RATIO_FLOOR, max_ratio * fed):
                raise CodecError(f"message body: expected <= {max_ratio:g} inflated "
                                 f"bytes per stored byte, got {pos} from the first "
                                 f"{fed}; a compression bomb, or raise max_ratio")
            if got or piece:
                stalled = False
            elif stalled or fed == len(body):
                break  # no input left and nothing more comes out: truncated
            else:
                stalled = True
    except (zlib.error, lzma.LZMAError) as err:
        raise CodecError(f"message body: expected a valid {stream} stream, got "
                         f"{err}") from err
    if pos != raw_size or not dec.eof or dec.unused_data or fed != len(body):
        raise CodecError(f"message body: expected a complete {stream} stream of "
                         f"{raw_size} bytes filling the {len(body)} stored, got "
                         f"{pos} bytes from {fed - len(dec.unused_data)}"
                         f"{'' if dec.eof else ' (unfinished)'}")
    return out


def _decode_tensor(entry: _Entry, body: memoryview) -> np.ndarray:
    what = f"tensor {entry.name!r}"
    values = np.frombuffer(body, dtype=entry.vtype, count=entry.nnz)
    values = values.astype(entry.dtype)
    if entry.dtype == _F32 and not np.isfinite(values).all():
        raise CodecError(f"{what}: expected finite values, got NaN or inf")
    if not entry.is_csr:
        return values.reshape(entry.shape)
    rows, cols = entry.shape[0], math.prod(entry.shape[1:])
    off = values.size * entry.vtype.itemsize
    indices = np.frombuffer(body, dtype=_INDEX[entry.icode], count=entry.nnz,
                            offset=off).astype(np.int64)
    off += indices.size * _INDEX[entry.icode].itemsize
    row_part = np.frombuffer(body, dtype=_INDEX[entry.rcode], offset=off)
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
