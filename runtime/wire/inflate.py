"""Bounded inflation of a compressed message body: a bomb costs at most
max(1 MiB, max_ratio x its stored size) plus one piece (limits in ``codec``).
"""

from __future__ import annotations

import lzma
import zlib

from ..errors import CodecError
from .format import RATIO_FLOOR

LZMA_MEMLIMIT = 64 << 20  # a forged xz header may ask for a huge dictionary
LZMA_OVERHEAD = 1 << 20  # xz decoder memory beyond its dictionary, with room
INFLATE_PIECE = 256 << 10  # output per decompress call
INFLATE_INPUT_PIECE = 64 << 10  # input per feed


def inflate_body(body: memoryview, code: int, raw_size: int, max_ratio: float) -> bytearray:
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

