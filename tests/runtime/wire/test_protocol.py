"""runtime/wire/protocol.py: SFCK chunk frames, the Reassembler and JSON control messages,
fed hostile input (no broker)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from sparsefedpp.runtime.errors import CodecError
from sparsefedpp.runtime.wire import protocol
from sparsefedpp.runtime.wire.protocol import (
    CHUNK_HEADER,
    CHUNK_MAGIC,
    MAX_CONTROL_BYTES,
    ProtocolError,
    Reassembler,
    control,
    parse_chunk,
    parse_control,
    split,
)

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
MAX = 1 << 20


def frame(body: bytes = b"abc", *, magic=CHUNK_MAGIC, version=1, index=0, count=1,
          total=None, digest=None) -> bytes:
    """One SFCK frame written field by field from the module docstring's layout."""
    total = len(body) if total is None else total
    digest = hashlib.sha256(body).digest() if digest is None else digest
    return CHUNK_HEADER.pack(magic, version, index, count, total, digest) + body


# ------------------------------------------------------------------ chunks
def test_split_frames_follow_the_documented_layout():
    chunks = split(PAYLOAD, 4096)
    assert len(chunks) == 3 and CHUNK_HEADER.size == 53
    digest = hashlib.sha256(PAYLOAD).digest()
    for i, data in enumerate(chunks):
        assert data[:4] == b"SFCK" and data[4] == 1
        chunk = parse_chunk(data, max_total=MAX)
        assert (chunk.index, chunk.count, chunk.total, chunk.digest) == \
            (i, 3, len(PAYLOAD), digest)
        assert chunk.body == PAYLOAD[i * 4096:(i + 1) * 4096]


def test_an_empty_payload_is_one_chunk_without_body():
    (data,) = split(b"")
    chunk = parse_chunk(data, max_total=MAX)
    assert (chunk.count, chunk.total, chunk.body) == (1, 0, b"")
    assert Reassembler(max_total=MAX).add("d", data) == b""


def test_split_refuses_a_chunk_size_below_one():
    with pytest.raises(ProtocolError, match="chunk size"):
        split(PAYLOAD, 0)


BAD_FRAMES = {
    "empty": (b"", "truncated"),
    "short header": (frame()[:52], "truncated"),
    "magic": (frame(magic=b"SFPP"), "chunk magic"),
    "version 0": (frame(version=0), "chunk version"),
    "version 2": (frame(version=2), "chunk version"),
    "total over the limit": (frame(total=MAX + 1), "declared payload"),
    "total 10 GB": (frame(total=10 * 10**9), "declared payload of 10000000000"),
    "total u64 max": (frame(total=2**64 - 1), "declared payload"),
    "count 0": (frame(count=0), "index < count"),
    "count over max_chunks": (frame(count=65537, total=10**5), "index < count"),
    "count u32 max": (frame(count=2**32 - 1, total=10**5), "index < count"),
    "index == count": (frame(index=1, count=1), "index 1 of 1"),
    "index past count": (frame(index=2**32 - 1, count=2), "index"),
    "body beyond total": (frame(b"abcdef", total=3), "body bytes"),
    "no body for a non-empty payload": (frame(b"", total=5), "body bytes"),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_parse_chunk_refuses_forged_headers(name):
    data, match = BAD_FRAMES[name]
    with pytest.raises(ProtocolError, match=match):
        parse_chunk(data, max_total=MAX)


def test_protocol_errors_are_codec_errors_with_their_own_exit_code():
    assert issubclass(ProtocolError, CodecError)
    assert ProtocolError.exit_code == 18


def _documented_frame_is_valid(data: bytes, max_total: int = MAX) -> bool:
    """The header rules of the module docstring, written out independently."""
    if len(data) < CHUNK_HEADER.size:
        return False
    magic, version, index, count, total, _ = CHUNK_HEADER.unpack_from(data)
    body = data[CHUNK_HEADER.size:]
    return (magic == CHUNK_MAGIC and version == 1 and total <= max_total
            and 1 <= count <= 65536 and index < count
            and len(body) <= total and (total == 0 or len(body) > 0))


def _random_frames(rng: random.Random, seed: int) -> list[bytes]:
    """Pure junk, junk after a good magic and version, and frames whose header fields
    are drawn around the limits (so that both good and bad frames come up)."""
    junk = rng.randbytes(seed * 7)
    body = rng.randbytes(rng.choice((0, 1, rng.randrange(2, 64))))
    fields = {"index": rng.choice((0, 1, 2, 2**32 - 1)),
              "count": rng.choice((0, 1, 3, 65536, 65537)),
              "total": rng.choice((0, len(body), len(body) + 5, max(0, len(body) - 1),
                                   MAX, MAX + 1)),
              "version": rng.choice((1, 1, 1, 0, 2))}
    return [junk, CHUNK_MAGIC + b"\x01" + junk, frame(body, **fields)]


def test_random_bytes_raise_only_protocol_error():
    # Arrange: seeded, so a failure names the seed and reproduces
    outcomes = {"accepted": 0, "rejected": 0}
    for seed in range(300):
        rng = random.Random(seed)
        for data in _random_frames(rng, seed % 40):
            # Act
            try:
                chunk = parse_chunk(data, max_total=MAX)
            except ProtocolError:
                # Assert: refused exactly what the documented rules refuse
                assert not _documented_frame_is_valid(data), f"seed {seed}: refused"
                outcomes["rejected"] += 1
                continue
            assert _documented_frame_is_valid(data), f"seed {seed}: accepted"
            assert chunk.body == data[CHUNK_HEADER.size:]
            assert chunk.index < chunk.count and len(chunk.body) <= chunk.total <= MAX
            outcomes["accepted"] += 1
    # both branches ran, so neither assertion above is vacuous
    assert outcomes["accepted"] > 20 and outcomes["rejected"] > 200, outcomes


# ------------------------------------------------------------------ reassembler
def test_chunks_out_of_order_are_joined():
    chunks = split(PAYLOAD, 1000)
    r = Reassembler(max_total=MAX)
    order = [5, 0, 10, 3, 1, 9, 2, 8, 4, 7]
    assert all(r.add("d", chunks[i]) is None for i in order)
    assert r.add("d", chunks[6]) == PAYLOAD


def test_a_redelivered_chunk_is_kept_once():
    chunks = split(PAYLOAD, 4096)
    r = Reassembler(max_total=MAX)
    assert r.add("d", chunks[0]) is None
    assert r.add("d", chunks[0]) is None  # QoS 1 redelivery
    assert r.add("d", chunks[1]) is None
    assert r.add("d", chunks[1]) is None
    assert r.add("d", chunks[2]) == PAYLOAD


def test_a_payload_sent_again_in_full_is_returned_again():
    r = Reassembler(max_total=MAX)
    chunks = split(PAYLOAD, 4096)
    for _ in range(2):
        got = [r.add("d", c) for c in chunks]
        assert got == [None, None, PAYLOAD]


def test_senders_are_reassembled_independently():
    other = PAYLOAD[::-1]
    a, b = split(PAYLOAD, 3000), split(other, 3000)
    r = Reassembler(max_total=MAX)
    out = []
    for ca, cb in zip(a, b, strict=True):
        out += [r.add("a", ca), r.add("b", cb)]
    assert out[-2:] == [PAYLOAD, other] and not any(out[:-2])


def test_a_new_transfer_replaces_an_unfinished_one_of_the_same_sender():
    old, new = split(PAYLOAD, 4096), split(PAYLOAD[:5000], 4096)
    r = Reassembler(max_total=MAX)
    assert r.add("d", old[0]) is None
    assert r.add("d", new[0]) is None
    assert r.add("d", new[1]) == PAYLOAD[:5000]
    # the old transfer was dropped: its last chunks alone never complete it
    assert r.add("d", old[1]) is None
    assert r.add("d", old[2]) is None


def test_forget_drops_the_open_transfer():
    chunks = split(PAYLOAD, 4096)
    r = Reassembler(max_total=MAX)
    r.add("d", chunks[0])
    r.add("d", chunks[1])
    r.forget("d")
    r.forget("never-seen")
    assert r.add("d", chunks[2]) is None


def test_dropped_transfers_are_reported_with_what_was_held():
    drops = []
    r = Reassembler(max_total=MAX, on_drop=lambda *a: drops.append(a))
    a, b = split(PAYLOAD, 4096), split(PAYLOAD[::-1], 4096)
    assert r.add("d", a[0]) is None and r.add("d", a[1]) is None
    assert r.add("d", b[2]) is None  # a newer transfer replaces the unfinished one
    assert drops == [("d", 2, 3, "replaced by a newer transfer")]
    r.forget("d", "the device went offline")
    assert drops[-1] == ("d", 1, 3, "the device went offline")
    r.forget("d", "again")  # nothing open: nothing reported
    for c in a:
        r.add("d", c)
    assert len(drops) == 2  # a finished transfer is no drop


def test_sha_mismatch_is_refused():
    chunks = split(PAYLOAD, 4096)
    forged = bytearray(chunks[1])
    forged[CHUNK_HEADER.size + 10] ^= 0xFF  # same header, one body byte changed
    r = Reassembler(max_total=MAX)
    r.add("d", chunks[0])
    r.add("d", bytes(forged))
    with pytest.raises(ProtocolError, match="SHA-256"):
        r.add("d", chunks[2])
    # the failed transfer is gone: a clean copy goes through
    assert [r.add("d", c) for c in chunks] == [None, None, PAYLOAD]


def test_a_header_digest_of_another_payload_is_refused():
    r = Reassembler(max_total=MAX)
    data = frame(b"hello", digest=hashlib.sha256(b"world").digest())
    with pytest.raises(ProtocolError, match="SHA-256"):
        r.add("d", data)


def test_more_bytes_than_the_declared_total_are_refused():
    digest = hashlib.sha256(b"x" * 10).digest()
    r = Reassembler(max_total=MAX)
    assert r.add("d", frame(b"x" * 8, index=0, count=2, total=10, digest=digest)) \
        is None
    with pytest.raises(ProtocolError, match="more bytes than the declared 10"):
        r.add("d", frame(b"x" * 8, index=1, count=2, total=10, digest=digest))


def test_fewer_bytes_than_the_declared_total_are_refused():
    digest = hashlib.sha256(b"x" * 10).digest()
    r = Reassembler(max_total=MAX)
    r.add("d", frame(b"x" * 3, index=0, count=2, total=10, digest=digest))
    with pytest.raises(ProtocolError, match="expected 10 bytes, the chunks hold 6"):
        r.add("d", frame(b"x" * 3, index=1, count=2, total=10, digest=digest))


def test_chunks_of_one_transfer_must_agree_on_count_and_total():
    digest = hashlib.sha256(b"y" * 12).digest()
    r = Reassembler(max_total=MAX)
    r.add("d", frame(b"y" * 4, index=0, count=3, total=12, digest=digest))
    with pytest.raises(ProtocolError, match="differ"):
        r.add("d", frame(b"y" * 4, index=1, count=4, total=12, digest=digest))
    r.add("d", frame(b"y" * 4, index=0, count=3, total=12, digest=digest))
    with pytest.raises(ProtocolError, match="differ"):
        r.add("d", frame(b"y" * 4, index=1, count=3, total=13, digest=digest))


def test_the_reassembler_limit_applies_before_anything_is_kept():
    r = Reassembler(max_total=1000)
    with pytest.raises(ProtocolError, match="declared payload of 10000000000"):
        r.add("d", frame(b"z", total=10 * 10**9, count=2))
    assert r._open == {}


def test_many_replaced_transfers_keep_one_per_sender():
    r = Reassembler(max_total=MAX)
    for i in range(50):
        r.add("d", split(PAYLOAD + bytes([i]), 4096)[0])
    assert len(r._open) == 1


# ------------------------------------------------------------------ control
def round_fields(**change) -> dict:
    fields = {"round": 0, "attempt": 0, "selected": ["0", "dev-1"],
              "deadline": 1.7e9, "config": {"lr": 0.1},
              "model": {"digest": "ab" * 32, "chunks": 2, "bytes": 300000}}
    fields.update(change)
    return fields


def message(kind: str, **fields) -> bytes:
    return json.dumps({"v": 1, "type": kind, **fields}).encode()


def test_control_messages_round_trip():
    assert parse_control(control("round", **round_fields()), "round")["selected"] == \
        ["0", "dev-1"]
    ack = parse_control(control("ack", round=-1, accepted=False, reason="bad"), "ack")
    assert ack == {"v": 1, "type": "ack", "round": -1, "accepted": False,
                   "reason": "bad"}
    assert parse_control(protocol.OFFLINE, "status")["state"] == "offline"
    assert parse_control(control("status", state="training", round=None), "status")
    assert parse_control(protocol.SERVER_OFFLINE, "server")["state"] == "offline"


ACK_OK = message("ack", round=0, accepted=True, reason="")
BAD_CONTROL = {
    "not JSON": (b"{", "ack", "UTF-8 JSON"),
    "not UTF-8": (b'{"v":1,"type":"ack","reason":"\xff"}', "ack", "UTF-8 JSON"),
    "a list": (b"[1, 2]", "ack", "JSON object"),
    "a number": (b"3", "ack", "JSON object"),
    "no v": (b'{"type":"ack","round":0,"accepted":true,"reason":""}', "ack", "v=1"),
    "v 2": (ACK_OK.replace(b'"v": 1', b'"v": 2'), "ack", "v=1"),
    "v true": (ACK_OK.replace(b'"v": 1', b'"v": true'), "ack", "v=1"),
    "v 1.0": (ACK_OK.replace(b'"v": 1', b'"v": 1.0'), "ack", "v=1"),
    "other type": (message("status", state="online"), "ack", "type='ack'"),
    "missing round": (message("ack", accepted=True, reason=""), "ack",
                      "missing field 'round'"),
    "missing reason": (message("ack", round=0, accepted=True), "ack",
                       "missing field 'reason'"),
    "missing state": (message("status", round=1), "status", "missing field 'state'"),
    "missing model": (message("round", **{k: v for k, v in round_fields().items()
                                          if k != "model"}), "round",
                      "missing field 'model'"),
    "round as string": (message("ack", round="1", accepted=True, reason=""), "ack",
                        "'round': expected an integer"),
    "round as float": (message("ack", round=1.0, accepted=True, reason=""), "ack",
                       "'round': expected an integer"),
    "round as bool": (message("ack", round=True, accepted=True, reason=""), "ack",
                      "'round': expected an integer"),
    "attempt as bool": (message("round", **round_fields(attempt=False)), "round",
                        "'attempt': expected an integer"),
    "accepted as int": (message("ack", round=0, accepted=1, reason=""), "ack",
                        "'accepted': expected true/false"),
    "accepted as string": (message("ack", round=0, accepted="true", reason=""), "ack",
                           "'accepted': expected true/false"),
    "reason as null": (message("ack", round=0, accepted=True, reason=None), "ack",
                       "'reason': expected a string"),
    "deadline as bool": (message("round", **round_fields(deadline=True)), "round",
                         "'deadline': expected an integer or a number"),
    "deadline as string": (message("round", **round_fields(deadline="soon")), "round",
                           "'deadline'"),
    "selected as string": (message("round", **round_fields(selected="0")), "round",
                           "'selected': expected a list"),
    "selected with a bad id": (message("round", **round_fields(selected=["a/b"])),
                               "round", "list of device ids"),
    "selected with a number": (message("round", **round_fields(selected=[1])),
                               "round", "list of device ids"),
    "negative round": (message("round", **round_fields(round=-1)), "round",
                       "'round': expected 0 to 4294967295, got -1"),
    "model digest short": (message("round", **round_fields(
        model={"digest": "ab", "chunks": 1, "bytes": 1})), "round", "64 hex"),
    "model chunks 0": (message("round", **round_fields(
        model={"digest": "ab" * 32, "chunks": 0, "bytes": 1})), "round", "chunks"),
    "model bytes bool": (message("round", **round_fields(
        model={"digest": "ab" * 32, "chunks": True, "bytes": 1})), "round", "chunks"),
    "config as list": (message("round", **round_fields(config=[])), "round",
                       "'config': expected an object"),
    "status state unknown": (message("status", state="hacked"), "status",
                             "expected state in"),
    "status round as string": (message("status", state="online", round="1"),
                               "status", "'round'"),
    "server state unknown": (message("server", state="training"), "server",
                             "expected state in"),
    "too large": (b" " * (MAX_CONTROL_BYTES + 1), "ack", "at most"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONTROL))
def test_parse_control_refuses_malformed_messages(name):
    data, kind, match = BAD_CONTROL[name]
    with pytest.raises(ProtocolError, match=match):
        parse_control(data, kind)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999",
                                    b"-1e999"])
def test_parse_control_refuses_non_finite_numbers(number):
    data = message("round", **round_fields()).replace(b"1700000000.0", number)
    assert number in data
    with pytest.raises(ProtocolError, match="non-finite"):
        parse_control(data, "round")
    data = message("round", **round_fields(config={"lr": 0.5})).replace(b"0.5", number)
    with pytest.raises(ProtocolError, match="non-finite"):
        parse_control(data, "round")


def test_control_refuses_to_write_what_parse_control_refuses():
    with pytest.raises(ProtocolError, match="expected true/false"):
        control("ack", round=0, accepted=1, reason="")
    with pytest.raises(ValueError):
        control("round", **round_fields(deadline=float("nan")))


@pytest.mark.parametrize("kind", sorted(protocol.CONTROL_LIMITS))
def test_a_control_message_of_exactly_its_types_limit_is_read(kind):
    limit = protocol.CONTROL_LIMITS[kind]
    fields = {"round": round_fields(config={"pad": ""}), "ack": dict(
        round=0, accepted=True, reason=""), "status": dict(state="online", detail=""),
        "server": dict(state="online", pad="")}[kind]
    body = json.dumps({"v": 1, "type": kind, **fields}).encode()
    data = body.replace(b'""', b'"' + b"x" * (limit - len(body)) + b'"', 1)
    assert len(data) == limit
    assert parse_control(data, kind)["type"] == kind
    with pytest.raises(ProtocolError, match=f"expected at most {limit} bytes, got "
                       f"{limit + 1}"):
        parse_control(data.replace(b"xx", b"xxx", 1), kind)


def test_small_control_messages_have_small_limits():
    assert protocol.CONTROL_LIMITS["round"] == MAX_CONTROL_BYTES == 1 << 20
    for kind in ("ack", "status", "server"):
        assert 4096 <= protocol.CONTROL_LIMITS[kind] <= 16384
    # the longest reason/detail the services send, every character JSON-escaped
    ack = control("ack", round=2**32 - 1, accepted=False, reason="\u2028" * 500,
                  digest="ab" * 32)
    status = control("status", state="error", round=2**32 - 1,
                     detail="\u2028" * 500, examples=2**31 - 1)
    assert len(ack) <= protocol.CONTROL_LIMITS["ack"]
    assert len(status) <= protocol.CONTROL_LIMITS["status"]


# ------------------------------------------------------------------ nesting depth
@pytest.mark.parametrize("text, depth", [
    (b"", 0), (b"3", 0), (b"{}", 1), (b"[[1], {}]", 2), (b'{"a": [{"b": [1]}]}', 4),
    (b'{"a": "[[[[{{{{"}', 1),                 # brackets inside strings do not count
    (b'{"a": "\\"[[[[", "b": []}', 2),        # an escaped quote stays in the string
    (b'{"a": "\\\\", "b": [[]]}', 3),         # an escaped backslash ends before "
    (b"[" * 2000, 2000),
    (b"]]][", 0),  # the parser stops at the first "]": no deeper than the text's start
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert protocol.json_depth(text) == depth


def test_deep_json_is_refused_before_parsing(monkeypatch):
    """A retained status of "[" x 2000 made json.loads raise RecursionError (it
    stopped the aggregator at every start); now the depth is refused first."""
    calls = []
    monkeypatch.setattr(protocol.json, "loads", lambda *a, **k: calls.append(a))
    for kind in ("status", "ack", "server", "round"):
        with pytest.raises(ProtocolError, match=r"expected JSON nested at most 16 "
                           r"levels deep, got 2000"):
            parse_control(b"[" * 2000, kind)
    nested = b'{"v": 1, "type": "status", "state": "online", "x": ' + \
        b"[" * 16 + b"]" * 16 + b"}"
    with pytest.raises(ProtocolError, match="got 17"):
        parse_control(nested, "status")
    assert calls == []


def test_a_depth_at_the_limit_is_parsed():
    data = b'{"v": 1, "type": "status", "state": "online", "x": ' + \
        b"[" * 15 + b"]" * 15 + b"}"
    assert parse_control(data, "status")["state"] == "online"


def test_any_parser_failure_is_a_protocol_error(monkeypatch):
    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(protocol.json, "loads", boom)
    with pytest.raises(ProtocolError, match=r"unreadable JSON \(RecursionError\)"):
        parse_control(ACK_OK, "ack")


def test_json_depth_of_a_megabyte_is_fast():
    import time

    data = json.dumps({"seeds": {str(i): 10**9 + i for i in range(60_000)},
                       "x": ['a\\"[b'] * 10_000}).encode()[: MAX_CONTROL_BYTES]
    start = time.perf_counter()
    protocol.json_depth(data)
    assert time.perf_counter() - start < 0.5  # ~15 ms here; a Python loop takes ~1 s


# ------------------------------------------------------------------ numbers, digests
@pytest.mark.parametrize("kind, fields, match", [
    ("status", dict(state="online", examples=0), "'examples': expected 1 to"),
    ("status", dict(state="online", examples=10**400), "'examples': expected 1 to"),
    ("status", dict(state="online", examples=True), "'examples': expected an integer"),
    ("status", dict(state="online", examples=1.5), "'examples': expected an integer"),
    ("status", dict(state="online", round=-2), "'round': expected -1 to"),
    ("status", dict(state="online", round=2**32), "'round': expected -1 to"),
    ("ack", dict(round=2**40, accepted=True, reason=""), "'round': expected -1 to"),
    ("ack", dict(round=0, accepted=True, reason="", digest="AB" * 32), "64 hex"),
    ("ack", dict(round=0, accepted=True, reason="", digest="ab"), "64 hex"),
    ("ack", dict(round=0, accepted=True, reason="", digest=None), "'digest'"),
    ("server", dict(state="online", rounds=-1), "'rounds': expected 0 to"),
    ("round", round_fields(attempt=2**33), "'attempt': expected 0 to"),
])
def test_numbers_in_control_messages_are_range_checked(kind, fields, match):
    with pytest.raises(ProtocolError, match=match):
        parse_control(message(kind, **fields), kind)


def test_optional_fields_examples_and_digest_are_read():
    status = parse_control(control("status", state="online", examples=250), "status")
    assert status["examples"] == 250
    assert "examples" not in parse_control(control("status", state="online"), "status")
    ack = parse_control(control("ack", round=0, accepted=True, reason="",
                                digest="0f" * 32), "ack")
    assert ack["digest"] == "0f" * 32
    assert parse_control(control("ack", round=0, accepted=False, reason="junk",
                                 digest=""), "ack")["digest"] == ""
    assert "digest" not in parse_control(ACK_OK, "ack")  # an older aggregator's ack


def test_transfer_id_is_the_chunk_headers_digest():
    chunks = split(PAYLOAD, 4096)
    assert {protocol.transfer_id(c) for c in chunks} == {protocol.digest_of(PAYLOAD)}
    assert protocol.transfer_id(b"JUNK" * 100) == ""
    assert protocol.transfer_id(chunks[0][:52]) == ""


# ------------------------------------------------------------------ topics and ids
@pytest.mark.parametrize("device", ["0", "pi-07", "a_b.c", "x" * 64])
def test_valid_device_ids(device):
    assert protocol.check_device_id(device) == device
    t = protocol.Topics()
    assert t.device_of(t.update(device), "update") == device


@pytest.mark.parametrize("device", ["", "x" * 65, "a/b", "+", "#", "a b", "é", "a\0"])
def test_invalid_device_ids_are_refused(device):
    assert not protocol.valid_device_id(device)
    with pytest.raises(ProtocolError, match="device id"):
        protocol.check_device_id(device)
    t = protocol.Topics()
    assert t.device_of(f"sfpp/update/{device}", "update") is None


def test_device_of_refuses_other_topics_and_nested_levels():
    t = protocol.Topics("farm1/sfpp")
    assert t.device_of("farm1/sfpp/update/d1", "update") == "d1"
    assert t.device_of("farm1/sfpp/update/d1/x", "update") is None
    assert t.device_of("sfpp/update/d1", "update") is None
    assert t.device_of("farm1/sfpp/status/d1", "update") is None


@pytest.mark.parametrize("prefix", ["", "a/+", "#", "/sfpp", "sfpp/", "a\0b"])
def test_bad_topic_prefixes_are_refused(prefix):
    with pytest.raises(ProtocolError, match="topic prefix"):
        protocol.Topics(prefix)
