"""Wire codec for models and updates: ``encode(Message) -> bytes``, ``decode(bytes)``.

One symmetric pair, no pickle and no ``np.save`` (a pickle on the wire runs code on
load; Flower's ``parameter.py`` says the same). ``decode`` trusts nothing: every
length, code, shape, index and value is checked and any violation raises
``CodecError``, never ``IndexError``/``struct.error``/``MemoryError``.

This module is the codec's public face and its specification; the work is in
``format`` (constants, ``Message``, ``Encoding``, the limits of an announced
model), ``encode``, ``decode`` and ``inflate`` (bounded decompression).
``decode`` returns its tensors as ``checks.CheckedTensors``: an update's values
are scanned once, on arrival, and the aggregator's later checks trust that.

Tensors: float32 (any shape) or int64 (e.g. ``num_batches_tracked``). A float32
tensor with ndim >= 2 may travel as CSR of its 2-D view rows x cols, rows =
shape[0], cols = prod(shape[1:]) (a conv weight (O, C, kh, kw) is O x C*kh*kw, as
``sparsity.csr.to_csr``); 1-D, 0-D and int64 tensors always travel dense. ``decode``
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

Measured raw/stored ratios of real encodings (tools/bench/codec_limits.py ratios:
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

from .decode import _body_sizes, decode
from .encode import _compress, encode, encoded_size
from .format import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_RATIO,
    ENCODINGS,
    KINDS,
    MAGIC,
    MAX_META_BYTES,
    MAX_METHOD_BYTES,
    MAX_NDIM,
    MAX_TENSOR_ELEMENTS,
    RATIO_FLOOR,
    SUPPORTED_VERSIONS,
    VERSION,
    Encoding,
    Message,
    Spec,
    max_encoded_size,
    model_spec,
)
from .inflate import INFLATE_INPUT_PIECE, INFLATE_PIECE, LZMA_MEMLIMIT, LZMA_OVERHEAD

__all__ = [
    "DEFAULT_MAX_ELEMENTS", "DEFAULT_MAX_RATIO", "ENCODINGS", "INFLATE_INPUT_PIECE",
    "INFLATE_PIECE", "KINDS", "LZMA_MEMLIMIT", "LZMA_OVERHEAD", "MAGIC",
    "MAX_META_BYTES", "MAX_METHOD_BYTES", "MAX_NDIM", "MAX_TENSOR_ELEMENTS",
    "RATIO_FLOOR", "SUPPORTED_VERSIONS", "VERSION", "Encoding", "Message", "Spec",
    "_body_sizes", "_compress", "decode", "encode", "encoded_size",
    "max_encoded_size", "model_spec",
]
