"""The SFPP format's constants, the ``Message`` and ``Encoding`` types, and the size
limits derived from an announced model (``model_spec``, ``max_encoded_size``).

Encoder and decoder both build on this module; the byte layout it encodes is
drawn in ``codec``'s docstring.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError

MAGIC = b"SFPP"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 2**31 - 1
DEFAULT_MAX_ELEMENTS = 2**27  # decoded budget: 512 MiB of float32 (ResNet-18: 11 M)
MAX_META_BYTES = 1 << 20
MAX_METHOD_BYTES = 64
DEFAULT_MAX_RATIO = 32.0  # raw / stored body; measured in codec's docstring
RATIO_FLOOR = 1 << 20  # raw bodies up to this size are never refused for ratio
_FIXED_BYTES = 43  # header + tail + CRC of a message without strings and tensors
_ENTRY_BYTES = 19  # a tensor entry without its name and shape

KINDS = ("model", "update")
F32, F16, I64 = np.dtype("<f4"), np.dtype("<f2"), np.dtype("<i8")
DTYPES = {1: F32, 2: I64}
VALUES = {1: F32, 2: F16, 3: I64}
INDEX = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("<i4")}
COMPRESS = {"none": 0, "zlib": 1, "lzma": 2}

PREFIX = struct.Struct("<4sHBBIQ")  # magic, version, flags, kind, round, num_examples
TYPE = struct.Struct("<BB")  # dtype, ndim
CODES = struct.Struct("<BBBBIQ")  # layout, index, row, value, nnz, body length
TAIL = struct.Struct("<BQ")  # compression, stored body length
U8, U32 = struct.Struct("<B"), struct.Struct("<I")


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
                   "values": ("f32", "f16"), "compress": tuple(COMPRESS)}
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



def resolve_encoding(encoding: Encoding | str) -> Encoding:
    if isinstance(encoding, Encoding):
        return encoding
    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding: expected an Encoding or one of "
                          f"{sorted(ENCODINGS)}, got {encoding!r}")
    return ENCODINGS[encoding]



def narrowest_code(max_value: int) -> int:
    """Code of the narrowest unsigned type (1 u8, 2 u16, 3 u32) holding max_value."""
    return 1 if max_value < 2**8 else 2 if max_value < 2**16 else 3



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
                or dtype not in (F32, I64) or len(shape) > MAX_NDIM \
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
    enc = None if encoding is None else resolve_encoding(encoding)
    total = _FIXED_BYTES + 255 + MAX_METHOD_BYTES + MAX_META_BYTES
    for name, (dtype, shape) in spec.items():
        total += _ENTRY_BYTES + len(name.encode("utf-8")) + 4 * len(shape)
        size = math.prod(shape)
        if dtype == I64:
            total += 8 * size
            continue
        value = 2 if enc is not None and enc.values == "f16" else 4
        body = size * (4 if enc is None else value)
        if len(shape) >= 2 and (enc is None or enc.sparse == "csr"):
            rows, cols = shape[0], math.prod(shape[1:])
            if enc is None or enc.index == "int32":
                csr = size * (value + 4) + 4 * (rows + 1)
            else:
                csr = size * (value + INDEX[narrowest_code(max(cols - 1, 0))].itemsize) \
                    + rows * INDEX[narrowest_code(cols)].itemsize
            body = max(body, csr)
        total += body
    return total

