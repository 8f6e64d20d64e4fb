"""``encode``: a ``Message`` to the bytes of the SFPP format (layout in ``codec``).

The encoder refuses what the format cannot carry (NaN/inf, f16 overflow, long
strings, non-JSON meta) with a CodecError, so a diverged update is never sent.
"""

from __future__ import annotations

import json
import lzma
import math
import struct
import zlib

import numpy as np

from ..errors import CodecError
from .format import (
    CODES,
    COMPRESS,
    F16,
    F32,
    I64,
    INDEX,
    KINDS,
    MAGIC,
    MAX_META_BYTES,
    MAX_METHOD_BYTES,
    MAX_NDIM,
    MAX_TENSOR_ELEMENTS,
    PREFIX,
    TAIL,
    TYPE,
    U32,
    U8,
    VERSION,
    Encoding,
    Message,
    narrowest_code,
    resolve_encoding,
)


def encode(msg: Message, encoding: Encoding | str = "csr") -> bytes:
    """Serialise ``msg``; ``encoding`` is an ``Encoding`` or a name in ``ENCODINGS``.

    Raises CodecError for content the format cannot carry (wrong dtype, NaN/inf,
    f16 overflow, over-long strings, non-JSON meta) and ConfigError for an unknown
    encoding. ``len(result)`` is the exact number of bytes that cross the wire.
    """
    enc = resolve_encoding(encoding)
    head = [_encode_header(msg)]
    bodies = []
    _check_names(msg.tensors)
    for name, arr in msg.tensors.items():
        entry, chunks = _encode_tensor(name, arr, enc)
        head.append(entry)
        bodies.extend(chunks)
    raw = b"".join(bodies)
    code = COMPRESS[enc.compress]
    body = _compress(raw, code)
    if len(body) >= len(raw):
        code, body = 0, raw
    head.append(TAIL.pack(code, len(body)))
    out = b"".join(head) + body
    return out + U32.pack(zlib.crc32(out))


def encoded_size(msg: Message, encoding: Encoding | str = "csr") -> int:
    """``len(encode(msg, encoding))``: the exact wire size in bytes."""
    return len(encode(msg, encoding))



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
    prefix = PREFIX.pack(MAGIC, VERSION, 0, KINDS.index(msg.kind),
                          _uint(msg.round, "message round", 32),
                          _uint(msg.num_examples, "message num_examples", 64))
    return b"".join([prefix, U8.pack(len(sender)), sender, U8.pack(len(method)),
                     method, U32.pack(len(meta)), meta, U32.pack(len(msg.tensors))])


def _numpy_scalar(value):
    """json.dumps hook: numpy scalars (np.float32 metrics) become Python numbers."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_names(tensors: dict) -> None:
    for name in tensors:
        _short(name, "tensor name", limit=255, allow_empty=False)



def _encode_tensor(name: str, arr, enc: Encoding) -> tuple[bytes, list[bytes]]:
    what = f"tensor {name!r}"
    if not isinstance(arr, np.ndarray) or arr.dtype not in (F32, I64):
        got = getattr(arr, "dtype", type(arr).__name__)
        raise CodecError(f"{what}: expected a float32 or int64 ndarray, got {got}; "
                         f"use .astype(np.float32)")
    if arr.ndim > MAX_NDIM or arr.size > MAX_TENSOR_ELEMENTS \
            or any(s >= 2**32 for s in arr.shape):
        raise CodecError(f"{what}: expected <= {MAX_NDIM} dims and <= "
                         f"{MAX_TENSOR_ELEMENTS} elements, got shape {arr.shape}")
    dtype_code = 1 if arr.dtype == F32 else 2
    head = (U8.pack(len(name.encode("utf-8"))) + name.encode("utf-8")
            + TYPE.pack(dtype_code, arr.ndim)
            + struct.pack(f"<{arr.ndim}I", *arr.shape))
    if arr.dtype == I64:
        values = np.ascontiguousarray(arr, dtype=I64).tobytes()
        return head + CODES.pack(0, 0, 0, 3, arr.size, len(values)), [values]
    if not np.isfinite(arr).all():
        raise CodecError(f"{what}: expected finite values, got NaN or inf; the "
                         f"update diverged, do not send it")
    vtype = F16 if enc.values == "f16" else F32
    vcode = 2 if enc.values == "f16" else 1
    csr = _csr_parts(arr, enc, vtype) if arr.ndim >= 2 and enc.sparse != "dense" \
        else None
    if csr is None:
        values = _as_values(arr.ravel(), vtype, what)
        return head + CODES.pack(0, 0, 0, vcode, arr.size, len(values)), [values]
    icode, rcode, nnz, parts = csr
    parts[0] = _as_values(parts[0], vtype, what)
    nbytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    chunks = [p if isinstance(p, bytes) else p.tobytes() for p in parts]
    return head + CODES.pack(1, icode, rcode, vcode, nnz, nbytes), chunks


def _csr_parts(arr: np.ndarray, enc: Encoding, vtype: np.dtype):
    """(index code, row code, nnz, [values, indices, rows]) or None if dense wins."""
    rows, cols = arr.shape[0], math.prod(arr.shape[1:])
    mat = arr.reshape(rows, cols)
    mask = mat != 0
    counts = mask.sum(axis=1)
    nnz = int(counts.sum())
    if enc.index == "int32":
        icode = rcode = 4
        row_part = np.zeros(rows + 1, dtype=INDEX[4])
        np.cumsum(counts, out=row_part[1:])
    else:
        icode = narrowest_code(max(cols - 1, 0))
        rcode = narrowest_code(int(counts.max()) if rows else 0)
        row_part = counts.astype(INDEX[rcode])
    csr_bytes = nnz * (vtype.itemsize + INDEX[icode].itemsize) + row_part.nbytes
    if enc.sparse == "auto" and csr_bytes >= arr.size * vtype.itemsize:
        return None
    indices = np.nonzero(mask)[1].astype(INDEX[icode])  # row-major: sorted per row
    return icode, rcode, nnz, [mat[mask], indices, row_part]


def _as_values(values: np.ndarray, vtype: np.dtype, what: str) -> bytes:
    if vtype == F16:
        with np.errstate(over="ignore"):
            half = values.astype(F16)
        if not np.isfinite(half).all():
            big = float(np.abs(values).max())
            raise CodecError(f"{what}: expected |values| <= 65504 for f16, got "
                             f"{big:g}; use an f32 encoding")
        return half.tobytes()
    return np.ascontiguousarray(values, dtype=F32).tobytes()


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
