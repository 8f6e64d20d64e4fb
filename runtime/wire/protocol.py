"""The MQTT wire protocol between the aggregator and devices, in one place.

Topics (``prefix`` defaults to ``"sfpp"``; docs/protocol.md has the full story):

=========================  =========  ========  ==========================================
topic                      writer     retained  payload
=========================  =========  ========  ==========================================
{p}/server                 aggregator yes       JSON ``server`` status (last will: offline)
{p}/round                  aggregator yes       JSON ``round`` announcement
{p}/model/{i}              aggregator yes       chunk i of the global model (SFCK frame)
{p}/update/{device}        device     never     chunks of the device's update (SFCK frame)
{p}/status/{device}        device     yes       JSON ``status`` (last will: offline)
{p}/ack/{device}           aggregator no        JSON ``ack`` of one update
=========================  =========  ========  ==========================================

Models and updates are ``wire.codec`` messages (with their own CRC32), cut into
chunks so that no MQTT message exceeds the broker's limit. A chunk (SFCK frame,
version 1, little-endian)::

    offset  size  field
    0       4     magic b"SFCK"
    4       1     u8  version (1)
    5       4     u32 index of this chunk (0 .. count-1)
    9       4     u32 count of chunks of the payload (>= 1)
    13      8     u64 total payload length in bytes
    21      32    SHA-256 of the whole payload (also the transfer's id)
    53      ...   this chunk's bytes (chunk i holds bytes [i*size, i*size + len))

Every chunk but the last carries the same number of bytes. The receiver checks
every field against its limits before keeping anything, then the SHA-256 of the
joined payload. Control messages are small JSON objects with ``"v": 1`` and a
``"type"``; ``parse_control`` bounds their size (per type) and nesting depth
before it parses them, checks every field and raises ``ProtocolError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError

PROTOCOL_VERSION = 1
CHUNK_MAGIC = b"SFCK"
CHUNK_HEADER = struct.Struct("<4sBIIQ32s")
DEFAULT_CHUNK_BYTES = 256 * 1024
DEFAULT_PREFIX = "sfpp"
MAX_CONTROL_BYTES = 1 << 20  # the round announcement: it carries per-device seeds
# Bytes a control message of each type may take: statuses, acks and server
# messages hold a few short fields (reason/detail <= 500 characters, 6 bytes
# each when JSON-escaped); only the announcement grows with the federation.
CONTROL_LIMITS = {"round": MAX_CONTROL_BYTES, "ack": 8192, "status": 8192,
                  "server": 8192}
MAX_CONTROL_DEPTH = 16  # nested objects/lists; the announcement uses 3
MAX_ROUND = 2**32 - 1   # a round number travels as u32 in the codec
MAX_EXAMPLES = 2**31 - 1
DEVICE_STATES = ("online", "offline", "training", "uploaded", "error")
SERVER_STATES = ("online", "offline", "finished")


class ProtocolError(CodecError):
    """A chunk or control message is malformed, too large or inconsistent."""

    exit_code = 18


# ---- topics ------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (no wildcards in the prefix)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self):
        if not self.prefix or any(c in self.prefix for c in "+#\0") or \
                self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ProtocolError(f"topic prefix: expected a plain topic like 'sfpp' or "
                                f"'farm1/sfpp', got {self.prefix!r}")

    @property
    def server(self) -> str:
        return f"{self.prefix}/server"

    @property
    def round(self) -> str:
        return f"{self.prefix}/round"

    def model(self, index: int | str) -> str:
        return f"{self.prefix}/model/{index}"

    def update(self, device: str) -> str:
        return f"{self.prefix}/update/{device}"

    def status(self, device: str) -> str:
        return f"{self.prefix}/status/{device}"

    def ack(self, device: str) -> str:
        return f"{self.prefix}/ack/{device}"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device id of ``{prefix}/{kind}/{device}``, else None."""
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            return None
        device = topic[len(head):]
        return device if valid_device_id(device) else None


def valid_device_id(device: str) -> bool:
    """1..64 characters of [A-Za-z0-9_.-]: safe in topics, file names and ACLs."""
    return (0 < len(device) <= 64 and device.isascii()
            and all(c.isalnum() or c in "_.-" for c in device))


def check_device_id(device: str, error: type[Exception] | None = None) -> str:
    """``device``, or ``error`` (ProtocolError by default) saying what is allowed."""
    if not isinstance(device, str) or not valid_device_id(device):
        raise (error or ProtocolError)(f"device id: expected 1 to 64 characters of letters, digits,"
                            f" '_', '.', '-', got {device!r}")
    return device


def client_seed(seed: int, rnd: int, device: str) -> int:
    """The local-training seed of ``device`` in round ``rnd``: announced by the
    aggregator, the same as the in-process simulation uses (a numeric id counts
    as its number, any other id as its CRC32)."""
    index = int(device) if device.isdigit() else zlib.crc32(device.encode())
    return seed * 1_000_003 + rnd * 1009 + index


# ---- chunks ------------------------------------------------------------------------


def split(payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Cut ``payload`` into SFCK frames of at most ``chunk_bytes`` body bytes each."""
    if chunk_bytes < 1:
        raise ProtocolError(f"chunk size: expected >= 1 byte, got {chunk_bytes}")
    digest = hashlib.sha256(payload).digest()
    count = max(1, math.ceil(len(payload) / chunk_bytes))
    return [CHUNK_HEADER.pack(CHUNK_MAGIC, PROTOCOL_VERSION, i, count, len(payload),
                              digest) + payload[i * chunk_bytes:(i + 1) * chunk_bytes]
            for i in range(count)]


def digest_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Chunk:
    index: int
    count: int
    total: int
    digest: bytes
    body: bytes


def parse_chunk(data: bytes, *, max_total: int, max_chunks: int = 65536) -> Chunk:
    """Check one SFCK frame's header against the limits (before anything is kept)."""
    if len(data) < CHUNK_HEADER.size:
        raise ProtocolError(f"chunk: expected at least {CHUNK_HEADER.size} header bytes, "
                            f"got {len(data)} (truncated?)")
    magic, version, index, count, total, digest = CHUNK_HEADER.unpack_from(data)
    if magic != CHUNK_MAGIC:
        raise ProtocolError(f"chunk magic: expected {CHUNK_MAGIC!r}, got {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"chunk version: expected {PROTOCOL_VERSION}, got {version}; "
                            f"update the older side")
    if total > max_total:
        raise ProtocolError(f"chunk: declared payload of {total} bytes, expected at most "
                            f"{max_total}")
    if not 1 <= count <= max_chunks or index >= count:
        raise ProtocolError(f"chunk: expected index < count <= {max_chunks}, got index "
                            f"{index} of {count}")
    body = bytes(data[CHUNK_HEADER.size:])
    if len(body) > total or (total and not body):
        raise ProtocolError(f"chunk {index}/{count}: expected 1 to {total} body bytes "
                            f"of a {total}-byte payload, got {len(body)}")
    return Chunk(index, count, total, digest, body)


class Reassembler:
    """Joins chunks into payloads, per sender, ignoring redelivered chunks.

    ``add`` returns the whole payload once its last chunk arrives (SHA-256
    checked), None while incomplete. A chunk received twice (QoS 1 may
    redeliver) is kept once. Each sender has one transfer in progress: a chunk
    of a new payload replaces an unfinished older one, so memory stays bounded
    by one payload per sender. A payload sent again in full is returned again:
    deciding that it is a duplicate is the receiver's business (it must still
    acknowledge it).

    ``on_drop(sender, held, count, why)`` is called when an unfinished transfer
    is dropped without an error of its own: replaced by a newer transfer, or
    ``forget`` (e.g. the sender went offline), so that the receiver can log it.
    """

    def __init__(self, *, max_total: int,
                 on_drop: Callable[[str, int, int, str], object] | None = None):
        self.max_total = max_total
        self.on_drop = on_drop
        self._open: dict[str, list] = {}  # sender -> [digest, parts, first, bytes]

    def add(self, sender: str, data: bytes) -> bytes | None:
        chunk = parse_chunk(data, max_total=self.max_total)
        entry = self._open.get(sender)
        if entry is None or entry[0] != chunk.digest:
            if entry is not None:
                self._dropped(sender, entry, "replaced by a newer transfer")
            entry = self._open[sender] = [chunk.digest, {}, chunk, 0]
        _, parts, first, held = entry
        if (chunk.count, chunk.total) != (first.count, first.total):
            del self._open[sender]
            raise ProtocolError(f"chunk {chunk.index}: count/total {chunk.count}/"
                                f"{chunk.total} differ from {first.count}/{first.total} "
                                f"of the same payload")
        held += len(chunk.body) - len(parts.get(chunk.index, b""))
        parts[chunk.index] = chunk.body
        entry[3] = held
        if held > chunk.total:
            del self._open[sender]
            raise ProtocolError(f"chunks: more bytes than the declared {chunk.total}")
        if len(parts) < chunk.count:
            return None
        del self._open[sender]
        payload = b"".join(parts[i] for i in range(chunk.count))
        if len(payload) != chunk.total:
            raise ProtocolError(f"payload: expected {chunk.total} bytes, the chunks "
                                f"hold {len(payload)}")
        if hashlib.sha256(payload).digest() != chunk.digest:
            raise ProtocolError("payload: SHA-256 of the joined chunks does not match "
                                "the chunks' header (corrupted or forged)")
        return payload

    def forget(self, sender: str, why: str = "forgotten") -> None:
        entry = self._open.pop(sender, None)
        if entry is not None:
            self._dropped(sender, entry, why)

    def _dropped(self, sender: str, entry: list, why: str) -> None:
        if self.on_drop is not None:
            self.on_drop(sender, len(entry[1]), entry[2].count, why)


def transfer_id(data: bytes) -> str:
    """The SHA-256 hex of the payload a chunk belongs to (its header's digest), or
    '' when ``data`` is not an SFCK frame: what an ack names."""
    if len(data) < CHUNK_HEADER.size or bytes(data[:4]) != CHUNK_MAGIC:
        return ""
    return bytes(data[21:CHUNK_HEADER.size]).hex()


# ---- control messages ----------------------------------------------------------------

_FIELDS = {  # type -> {field: (python types, required)}
    "round": {"round": (int, True), "attempt": (int, True), "selected": (list, True),
              "deadline": ((int, float), True), "model": (dict, True),
              "config": (dict, True)},
    "ack": {"round": (int, True), "accepted": (bool, True), "reason": (str, True),
            "digest": (str, False)},
    "status": {"state": (str, True), "round": ((int, type(None)), False),
               "detail": (str, False), "examples": (int, False)},
    "server": {"state": (str, True), "round": ((int, type(None)), False),
               "rounds": ((int, type(None)), False)},
}


def control(kind: str, **fields) -> bytes:
    """A JSON control message of type ``kind`` (checked like ``parse_control``)."""
    msg = {"v": PROTOCOL_VERSION, "type": kind, **fields}
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    parse_control(data, kind)
    return data


def parse_control(data: bytes, kind: str) -> dict:
    """Decode and check a control message of type ``kind``; ProtocolError if bad.

    The size (``CONTROL_LIMITS[kind]``) and the nesting depth are checked before
    the JSON parser sees the bytes: a retained ``[[[[...`` must not reach it
    (CPython's parser recurses per level)."""
    data = bytes(data)
    limit = CONTROL_LIMITS[kind]
    if len(data) > limit:
        raise ProtocolError(f"{kind} message: expected at most {limit} bytes, got "
                            f"{len(data)}")
    depth = json_depth(data)
    if depth > MAX_CONTROL_DEPTH:
        raise ProtocolError(f"{kind} message: expected JSON nested at most "
                            f"{MAX_CONTROL_DEPTH} levels deep, got {depth}")
    try:
        msg = json.loads(data.decode("utf-8"),
                         parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"{kind} message: expected UTF-8 JSON, got {e}") from None
    except Exception as e:  # noqa: BLE001 - RecursionError, MemoryError, ...
        raise ProtocolError(f"{kind} message: unreadable JSON ({type(e).__name__})"
                            ) from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{kind} message: expected a JSON object, got "
                            f"{type(msg).__name__}")
    if type(msg.get("v")) is not int or msg.get("v") != PROTOCOL_VERSION or \
            msg.get("type") != kind:
        raise ProtocolError(f"{kind} message: expected v={PROTOCOL_VERSION} and type="
                            f"{kind!r}, got v={msg.get('v')!r} and type="
                            f"{msg.get('type')!r}")
    for name, (types, required) in _FIELDS[kind].items():
        if name not in msg:
            if required:
                raise ProtocolError(f"{kind} message: missing field {name!r}")
            continue
        value = msg[name]
        bad_bool = isinstance(value, bool) and bool not in _as_tuple(types)
        if bad_bool or not isinstance(value, types):
            raise ProtocolError(f"{kind} message field {name!r}: expected "
                                f"{_type_names(types)}, got {value!r:.80}")
    _check_semantics(kind, msg)
    return msg


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in ``data`` (JSON text),
    at C speed (a regex drops the strings, ``translate`` keeps the brackets, a
    cumulative sum counts), so that a hostile depth is refused before parsing.
    Brackets after an unterminated string count too: such text is refused
    anyway."""
    brackets = _STRINGS.sub(b"", data).translate(None, _BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)],
                         dtype=np.int64).max(initial=0))


def _in_range(value, low: int, high: int) -> bool:
    return value is None or low <= value <= high


def _check_semantics(kind: str, msg: dict) -> None:
    for name, low, high in _RANGES.get(kind, ()):
        if not _in_range(msg.get(name), low, high):
            raise ProtocolError(f"{kind} message field {name!r}: expected {low} to "
                                f"{high}, got {msg[name]!r:.40}")
    if kind == "ack" and "digest" in msg and not _hex_digest(msg["digest"], empty=True):
        raise ProtocolError("ack message field 'digest': expected 64 hex characters "
                            "or ''")
    if kind == "round":
        if not all(isinstance(d, str) and valid_device_id(d) for d in msg["selected"]):
            raise ProtocolError("round message field 'selected': expected a list of "
                                "device ids")
        model = msg["model"]
        if not (_hex_digest(model.get("digest"))
                and type(model.get("chunks")) is int and model["chunks"] >= 1
                and type(model.get("bytes")) is int and model["bytes"] >= 0):
            raise ProtocolError("round message field 'model': expected {digest: 64 hex "
                                "chars, chunks: int >= 1, bytes: int >= 0}")
    elif kind == "status" and msg["state"] not in DEVICE_STATES:
        raise ProtocolError(f"status message: expected state in {DEVICE_STATES}, got "
                            f"{msg['state']!r}")
    elif kind == "server" and msg["state"] not in SERVER_STATES:
        raise ProtocolError(f"server message: expected state in {SERVER_STATES}, got "
                            f"{msg['state']!r}")


_RANGES = {  # type -> (integer field, lowest, highest); None passes
    "round": (("round", 0, MAX_ROUND), ("attempt", 0, MAX_ROUND)),
    "ack": (("round", -1, MAX_ROUND),),
    "status": (("round", -1, MAX_ROUND), ("examples", 1, MAX_EXAMPLES)),
    "server": (("round", 0, MAX_ROUND), ("rounds", 0, MAX_ROUND)),
}


def _hex_digest(value, empty: bool = False) -> bool:
    """A SHA-256 hex digest (64 lowercase hex characters), or '' with ``empty``."""
    return isinstance(value, str) and (
        (empty and value == "") or
        (len(value) == 64 and all(c in "0123456789abcdef" for c in value)))


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)  # 1e999 overflows to inf without passing parse_constant
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
             list: "a list", dict: "an object", type(None): "null"}
    return " or ".join(names[t] for t in _as_tuple(types))


OFFLINE = control("status", state="offline")
SERVER_OFFLINE = control("server", state="offline")
