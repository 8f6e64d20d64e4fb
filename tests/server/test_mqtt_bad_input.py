"""Hostile and malformed updates against a real aggregator process over Mosquitto.

The test plays device "evil" with a raw paho client: it is registered and
online, so it is selected, and when round 1 opens it publishes a long list of
broken updates on its own update topic, one after another, each answered by a
rejecting ack with a reason and the digest of the upload; then a valid update
(accepted) and the same one again (acknowledged "already counted", not counted
twice; again so in round 2, where another round-1 update is refused as late).
Two honest device processes
train meanwhile; the federation must complete both rounds as if nothing had
happened. A registered but silent device "ghost" keeps round 1 open until the
test is done (it then goes offline and the round closes after offline_grace).

Also: ``update_problem`` unit tests (no broker) and a local check that every
payload builder really produces what its case name says.
"""

from __future__ import annotations

import hashlib
import math
import queue
import re
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sparsefedpp.runtime.errors import CodecError
from sparsefedpp.runtime.wire import codec, protocol
from sparsefedpp.runtime.wire.codec import Encoding, Message
from sparsefedpp.server.arrival import update_problem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fedproc import Federation, make_shards, require_cifar, write_config

pytestmark = pytest.mark.mqtt

MAX_NORM = 1000.0
ACK_TIMEOUT = 60.0
MAX_EXAMPLES = 100_000  # ServiceConfig's default


# ------------------------------------------------------------------ update_problem
def _ref() -> dict:
    return {"w": np.zeros((3, 4), np.float32), "b": np.ones(4, np.float32),
            "n": np.array(5, np.int64)}


def _msg(tensors: dict, num_examples: int = 10) -> Message:
    return Message("update", 0, "d", "fedavg", tensors, num_examples)


def test_update_problem_accepts_a_matching_update():
    ref = _ref()
    assert update_problem(_msg(_ref()), ref, max_examples=100, max_norm=None) == ""
    assert update_problem(_msg(_ref(), 1), ref, max_examples=1, max_norm=1e-9) == ""


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop("b"), r"missing \['b'\], extra \[\]"),
    (lambda t: t.update(x=np.zeros(1, np.float32)), r"missing \[\], extra \['x'\]"),
    (lambda t: t.update(w=np.zeros((4, 3), np.float32)),
     r"tensor 'w': expected float32 \(3, 4\), got float32 \(4, 3\)"),
    (lambda t: t.update(w=np.zeros(12, np.float32)), "tensor 'w'"),
    (lambda t: t.update(b=np.ones(4, np.float64)),
     r"expected float32 \(4,\), got float64"),
    (lambda t: t.update(b=np.ones(4, np.int64)), "got int64"),
    (lambda t: t.update(n=np.array(5.0, np.float32)), "tensor 'n': expected int64"),
    (lambda t: t["w"].__setitem__((1, 2), np.nan), "tensor 'w' holds NaN or inf"),
    (lambda t: t["b"].__setitem__(0, np.inf), "tensor 'b' holds NaN or inf"),
    (lambda t: t["b"].__setitem__(3, -np.inf), "NaN or inf"),
])
def test_update_problem_names_what_is_wrong(change, match):
    tensors = _ref()
    change(tensors)
    problem = update_problem(_msg(tensors), _ref(), max_examples=100, max_norm=None)
    assert re.search(match, problem), problem


@pytest.mark.parametrize("n", [0, 101, 2**63, 2**64 - 1])
def test_update_problem_bounds_num_examples(n):
    problem = update_problem(_msg(_ref(), n), _ref(), max_examples=100, max_norm=None)
    assert problem == f"num_examples: expected 1 to 100, got {n}"


def test_update_problem_checks_names_before_the_example_count():
    tensors = _ref()
    del tensors["w"]
    problem = update_problem(_msg(tensors, 0), _ref(), max_examples=100, max_norm=None)
    assert "tensor names" in problem


def test_update_problem_bounds_the_l2_norm_of_the_change():
    ref, tensors = _ref(), _ref()
    tensors["w"][0, :] += 3.0  # norm of the change: sqrt(4 * 9) = 6
    tensors["n"] = np.array(10**12, np.int64)  # integer buffers do not count
    assert update_problem(_msg(tensors), ref, max_examples=100, max_norm=6.0) == ""
    problem = update_problem(_msg(tensors), ref, max_examples=100, max_norm=5.99)
    assert problem == "update norm 6 exceeds max_update_norm 5.99"
    assert update_problem(_msg(tensors), ref, max_examples=100, max_norm=None) == ""


def test_update_problem_norm_does_not_overflow_in_float32():
    tensors = _ref()
    tensors["b"][:] = 3e38  # squares overflow float32, not float64
    problem = update_problem(_msg(tensors), _ref(), max_examples=100, max_norm=1e39)
    assert problem == ""
    problem = update_problem(_msg(tensors), _ref(), max_examples=100, max_norm=1e6)
    assert "exceeds max_update_norm" in problem and "inf" not in problem


# ------------------------------------------------------------------ hostile payloads
@dataclass
class Ctx:
    """What a payload builder knows: the round's global model and the method."""

    tensors: dict
    rnd: int
    method: str


def encode_update(ctx: Ctx, tensors: dict | None = None, *, rnd: int | None = None,
                  sender: str = "evil", kind: str = "update", num_examples: int = 10,
                  encoding: Encoding | str = "dense") -> bytes:
    msg = Message(kind, ctx.rnd if rnd is None else rnd, sender, ctx.method,
                  dict(ctx.tensors) if tensors is None else tensors, num_examples, {})
    return codec.encode(msg, encoding)


def recrc(data: bytes | bytearray) -> bytes:
    """``data`` with its CRC32 recomputed: a forged message that passes the CRC."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def first(tensors: dict, name: str) -> dict:
    """The same tensors with ``name`` first on the wire (its body starts the body)."""
    return {name: tensors[name], **{k: v for k, v in tensors.items() if k != name}}


def one_d(ctx: Ctx) -> str:
    return next(k for k, v in ctx.tensors.items() if v.ndim == 1 and v.size)


def two_d(ctx: Ctx) -> str:
    return next(k for k, v in ctx.tensors.items()
                if v.ndim >= 2 and np.count_nonzero(v))


def dense_body_start(data: bytes, tensors: dict) -> int:
    """Offset of the body of a "dense", uncompressed message (nbytes per tensor)."""
    return len(data) - 4 - sum(v.nbytes for v in tensors.values())


def with_first_value(ctx: Ctx, value: float) -> bytes:
    tensors = first(ctx.tensors, one_d(ctx))
    data = bytearray(encode_update(ctx, tensors))
    start = dense_body_start(data, tensors)
    data[start:start + 4] = struct.pack("<f", value)
    return recrc(data)


def huge_shape(ctx: Ctx) -> bytes:
    """The first tensor (1-D) declares 2**32 - 1 elements in the tensor table."""
    name = one_d(ctx)
    data = bytearray(encode_update(ctx, first(ctx.tensors, name)))
    head = 20 + 1 + len("evil") + 1 + len(ctx.method) + 4 + len(b"{}") + 4
    shape_at = head + 1 + len(name.encode()) + 2
    assert struct.unpack_from("<I", data, shape_at)[0] == ctx.tensors[name].shape[0]
    struct.pack_into("<I", data, shape_at, 2**32 - 1)
    return recrc(data)


def huge_body_length(ctx: Ctx) -> bytes:
    """The stored body length C says 2**62 bytes."""
    data = bytearray(encode_update(ctx))
    at = dense_body_start(data, ctx.tensors) - 8
    assert struct.unpack_from("<Q", data, at)[0] == sum(
        v.nbytes for v in ctx.tensors.values())
    struct.pack_into("<Q", data, at, 2**62)
    return recrc(data)


def csr_column_out_of_range(ctx: Ctx) -> bytes:
    """A CSR weight (int32 indices) whose first column index equals the column count."""
    name = two_d(ctx)
    tensors = first(ctx.tensors, name)
    data = bytearray(encode_update(ctx, tensors,
                                   encoding=Encoding(sparse="csr", index="int32")))
    raw = 0
    for v in tensors.values():
        nnz = np.count_nonzero(v)
        raw += nnz * 8 + (v.shape[0] + 1) * 4 if v.ndim >= 2 else v.nbytes
    w = tensors[name]
    at = len(data) - 4 - raw + np.count_nonzero(w) * 4  # after the nnz f32 values
    cols = math.prod(w.shape[1:])
    assert struct.unpack_from("<i", data, at)[0] < cols
    struct.pack_into("<i", data, at, cols)
    return recrc(data)


def change(ctx: Ctx, name_of: Callable[[Ctx], str], new: Callable) -> dict:
    tensors = dict(ctx.tensors)
    name = name_of(ctx)
    tensors[name] = new(tensors[name])
    return tensors


def without(ctx: Ctx) -> dict:
    tensors = dict(ctx.tensors)
    del tensors[two_d(ctx)]
    return tensors


def flipped(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x40
    return bytes(out)


def chunk(body: bytes, *, version=1, index=0, count=1, total=None,
          digest=None) -> bytes:
    """One SFCK frame with any header fields (see runtime/wire/protocol.py)."""
    total = len(body) if total is None else total
    digest = hashlib.sha256(body).digest() if digest is None else digest
    head = protocol.CHUNK_HEADER.pack(protocol.CHUNK_MAGIC, version, index, count,
                                      total, digest)
    return head + body


def sha_mismatch(ctx: Ctx) -> list[bytes]:
    chunks = protocol.split(encode_update(ctx), 64 * 1024)
    bad = bytearray(chunks[-1])
    bad[-1] ^= 0xFF
    return chunks[:-1] + [bytes(bad)]


def junk(n: int, seed: int = 7) -> bytes:
    return b"JUNK" + np.random.default_rng(seed).bytes(n)


# (name, builder -> codec payload (wrapped in valid chunks) or list of raw MQTT
# messages, a regex the reason must match)
Builder = Callable[[Ctx], "bytes | list[bytes]"]
CASES: list[tuple[str, Builder, str]] = [
    # the chunk frame itself
    ("not a chunk (random bytes)", lambda c: [junk(500)], r"bad chunk: chunk magic"),
    ("empty MQTT message", lambda c: [b""], r"bad chunk: .*truncated"),
    ("chunk version 2", lambda c: [chunk(b"x" * 10, version=2)], r"chunk version"),
    ("chunk header declares 10 GB", lambda c: [chunk(b"x" * 10, count=2,
                                                      total=10 * 10**9)],
     r"declared payload of 10000000000 bytes"),
    ("chunk header declares 2**32-1 chunks", lambda c: [chunk(b"x" * 10,
                                                               count=2**32 - 1,
                                                               total=1000)],
     r"index < count <= 65536"),
    ("chunk body beyond the declared total", lambda c: [chunk(b"x" * 100, total=10)],
     r"body bytes"),
    ("chunks whose SHA-256 does not match", sha_mismatch, r"SHA-256"),
    # the codec message
    ("random bytes", lambda c: junk(2000), r"undecodable update: message magic"),
    ("truncated codec payload", lambda c: encode_update(c)[:-1000],
     r"undecodable update: .*(truncated|checksum)"),
    ("wrong magic", lambda c: b"XXXX" + encode_update(c)[4:], r"message magic"),
    ("unsupported version", lambda c: encode_update(c)[:4] + struct.pack("<H", 2)
     + encode_update(c)[6:], r"message version: .*got 2"),
    ("bad CRC (a flipped byte)", lambda c: flipped(encode_update(c)),
     r"message checksum"),
    ("codec header declares a 2**32-1 element tensor", huge_shape,
     r"expected <= 2147483647 elements"),
    ("codec header declares a 2**62-byte body", huge_body_length,
     r"4611686018427387904 bytes.*(truncated|forged)"),
    ("CSR column index out of range", csr_column_out_of_range,
     r"expected column indices in \[0, \d+\)"),
    ("NaN value", lambda c: with_first_value(c, float("nan")), r"finite values"),
    ("Inf value", lambda c: with_first_value(c, float("inf")), r"finite values"),
    # a well-formed message that is not an acceptable update
    ("wrong tensor shape", lambda c: encode_update(c, change(
        c, two_d, lambda v: np.zeros((v.shape[0] + 1,) + v.shape[1:], np.float32))),
     r"undecodable update: tensor '.+': expected float32 \(.*\) as in the announced "
     r"model, got float32 \("),
    ("wrong tensor dtype", lambda c: encode_update(c, change(
        c, one_d, lambda v: np.zeros(v.shape, np.int64))), r"got int64"),
    ("missing tensor", lambda c: encode_update(c, without(c)),
     r"undecodable update: tensor count: expected \d+ \(the announced model\)"),
    ("extra tensor", lambda c: encode_update(
        c, {**c.tensors, "evil.weight": np.ones(3, np.float32)}),
     r"undecodable update: tensor count: expected \d+ \(the announced model\)"),
    ("a tensor the model does not have", lambda c: encode_update(c, {
        **without(c), "evil.weight": np.ones(3, np.float32)}),
     r"tensor 'evil.weight': expected a tensor of the announced model .*unknown name"),
    ("round + 5", lambda c: encode_update(c, rnd=c.rnd + 5),
     r"round 6 is not open yet \(now round 1\)"),
    ("sender is another device", lambda c: encode_update(c, sender="0"),
     r"expected an update sent by evil, got kind 'update' from '0'"),
    ("empty sender", lambda c: encode_update(c, sender=""), r"sent by evil"),
    ("kind model instead of update", lambda c: encode_update(c, kind="model"),
     r"got kind 'model'"),
    ("num_examples 0", lambda c: encode_update(c, num_examples=0),
     r"num_examples: expected 1 to 100000, got 0"),
    ("num_examples 2**64-1", lambda c: encode_update(c, num_examples=2**64 - 1),
     r"num_examples: .*got 18446744073709551615"),
    ("update norm above max_update_norm", lambda c: encode_update(c, change(
        c, two_d, lambda v: v + np.float32(100))), r"exceeds max_update_norm 1000"),
]


def payload_messages(built) -> list[bytes]:
    """What goes on the wire: a list is raw MQTT messages, bytes are chunked."""
    return built if isinstance(built, list) else protocol.split(built)


def test_every_hostile_payload_is_what_its_name_says():
    """Offline: each case fails the aggregator's own checks with its reason
    (chunks, then codec, then the update checks), and the valid one passes."""
    from sparsefedpp.runtime import models

    net = models.build("cnn", num_classes=10, seed=0)
    ctx = Ctx(net.state_dict(), 0, "sparsefedpp")
    assert update_problem(codec.decode(encode_update(ctx)), ctx.tensors,
                          max_examples=MAX_EXAMPLES, max_norm=MAX_NORM) == ""
    for name, build, match in CASES:
        reasons = []
        r = protocol.Reassembler(max_total=256 << 20)
        for data in payload_messages(build(ctx)):
            try:
                payload = r.add("evil", data)
            except protocol.ProtocolError as e:
                reasons.append(f"bad chunk: {e}")
                continue
            if payload is None:
                continue
            try:  # as the aggregator decodes: bounded by the announced model
                msg = codec.decode(payload, like=ctx.tensors, exact=True)
            except CodecError as e:
                reasons.append(f"undecodable update: {e}")
                continue
            if msg.kind != "update" or msg.sender != "evil":
                reasons.append(f"expected an update sent by evil, got kind "
                               f"{msg.kind!r} from {msg.sender!r}")
            elif msg.round != 0:
                reasons.append(f"round {msg.round + 1} is not open yet (now round 1)")
            else:
                reasons.append(update_problem(msg, ctx.tensors, max_examples=MAX_EXAMPLES,
                                              max_norm=MAX_NORM))
        assert len(reasons) == 1 and re.search(match, reasons[0]), (name, reasons)


# ------------------------------------------------------------------ the live run
class Spy:
    """A raw MQTT 5 client playing device "evil" (anonymous broker: it also reads
    every status and ack). The paho thread only files messages away."""

    def __init__(self, host: str, port: int):
        import paho.mqtt.client as mqtt

        self.cond = threading.Condition()
        self.rounds: list[dict] = []
        self.models: dict[str, bytes] = {}
        self.status: dict[str, str] = {}
        self.acks: dict[str, queue.Queue] = {}
        self.errors: list[str] = []
        self._models = protocol.Reassembler(max_total=64 << 20)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="sfpp-client-evil", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30, clean_start=True)
        self.client.loop_start()
        for topic in ("sfpp/round", "sfpp/model/+", "sfpp/ack/+", "sfpp/status/+"):
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message):
        try:
            topic, payload = message.topic, bytes(message.payload)
            with self.cond:
                if topic == "sfpp/round" and payload:
                    self.rounds.append(protocol.parse_control(payload, "round"))
                elif topic.startswith("sfpp/model/") and payload:
                    model = self._models.add("aggregator", payload)
                    if model is not None:
                        self.models[protocol.digest_of(model)] = model
                elif topic.startswith("sfpp/ack/"):
                    self.acks.setdefault(topic.rsplit("/", 1)[1], queue.Queue()).put(
                        protocol.parse_control(payload, "ack"))
                elif topic.startswith("sfpp/status/") and payload:
                    self.status[topic.rsplit("/", 1)[1]] = protocol.parse_control(
                        payload, "status")["state"]
                self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - an exception would kill paho's thread
            self.errors.append(f"{message.topic}: {e!r}")

    def wait_for(self, what: Callable, timeout: float, why: str):
        with self.cond:
            value = self.cond.wait_for(what, timeout)
        assert value, f"timed out after {timeout} s waiting for {why}"
        return value

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(30)
        assert info.is_published(), topic

    def send(self, messages: list[bytes]) -> dict:
        """Publish the messages on sfpp/update/evil and return the next ack."""
        for data in messages:
            self.publish("sfpp/update/evil", data)
        try:
            return self.acks.setdefault("evil", queue.Queue()).get(timeout=ACK_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no ack within {ACK_TIMEOUT} s") from None

    def announced(self, rnd: int, timeout: float) -> tuple[dict, Message]:
        ann = self.wait_for(lambda: next((a for a in self.rounds if a["round"] == rnd),
                                         None), timeout, f"round {rnd + 1}")
        model = self.wait_for(lambda: self.models.get(ann["model"]["digest"]), 30,
                              f"the model of round {rnd + 1}")
        return ann, codec.decode(model)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    require_cifar()
    return make_shards(tmp_path_factory.mktemp("shards"), 2)


def test_hostile_updates_are_rejected_and_the_federation_completes(tmp_path, mosquitto,
                                                                   shards):
    fed = Federation(tmp_path, mosquitto.url)
    spy = Spy(mosquitto.host, mosquitto.port)
    try:
        _run_hostile_federation(fed, spy, tmp_path, shards)
    finally:
        spy.close()
        fed.close()


def _run_hostile_federation(fed: Federation, spy: Spy, tmp_path: Path,
                            shards: list[Path]) -> None:
    config = write_config(tmp_path / "fed.toml", ["0", "1", "evil", "ghost"], rounds=2,
                          per_round=4, min_clients=2, round_timeout=300,
                          device_grace=3, offline_grace=2, max_update_norm=MAX_NORM)
    for d in ("evil", "ghost"):
        spy.publish(f"sfpp/status/{d}", protocol.control("status", state="online"),
                    retain=True)
    fed.device("0", shards[0])
    fed.device("1", shards[1])
    spy.wait_for(lambda: spy.status.get("0") == spy.status.get("1") == "online", 120,
                 "the honest devices online")
    fed.server(config)

    # ---- round 1: garbage, then a valid update and its duplicate
    ann, model = spy.announced(0, 120)
    assert sorted(ann["selected"]) == ["0", "1", "evil", "ghost"]
    ctx = Ctx(model.tensors, 0, ann["config"]["method"]["method"])
    valid = encode_update(ctx)

    spy.publish("sfpp/update/stranger", protocol.split(valid)[0])  # unregistered
    outcomes = []
    for name, build, match in CASES:
        messages = payload_messages(build(ctx))
        ack = spy.send(messages)
        outcomes.append((name, match, ack, messages))
    first_ack = spy.send(protocol.split(valid))
    replay_ack = spy.send(protocol.split(valid))
    spy.publish("sfpp/status/ghost", protocol.OFFLINE, retain=True)  # closes round 1

    bad = [(n, a) for n, m, a, _ in outcomes if a["accepted"] or not re.search(
        m, a["reason"])]
    assert not bad, "\n".join(f"{n}: {a}" for n, a in bad)
    for name, _, ack, messages in outcomes:  # each ack names the upload it answers
        assert ack["digest"] == protocol.transfer_id(messages[-1]), name
    assert first_ack == {"v": 1, "type": "ack", "round": 0, "accepted": True,
                         "reason": "", "digest": protocol.digest_of(valid)}
    assert replay_ack == dict(first_ack, reason="already counted")

    # ---- round 2: the round-1 update again (closed round), then a valid one
    ann2, model2 = spy.announced(1, 120)
    assert sorted(ann2["selected"]) == ["0", "1", "evil"]
    late_ack = spy.send(protocol.split(valid))  # counted in round 1
    assert late_ack == dict(first_ack, reason="already counted")
    stale_ack = spy.send(protocol.split(encode_update(ctx, num_examples=11)))
    assert not stale_ack["accepted"]
    assert "round 1 is closed (now round 2)" in stale_ack["reason"]
    ctx2 = Ctx(model2.tensors, 1, ann2["config"]["method"]["method"])
    assert spy.send(protocol.split(encode_update(ctx2)))["accepted"]

    assert fed.wait("server", 120) == 0, fed.log("server")
    for d in ("0", "1"):
        assert fed.wait(f"device-{d}", 60) == 0, fed.log(f"device-{d}")
    assert not spy.errors, spy.errors
    assert "stranger" not in spy.acks  # dropped without an ack
    log = fed.log("server")
    assert "dropped an update from unregistered device 'stranger'" in log

    r1, r2 = fed.rounds()
    assert (r1["round"], r2["round"]) == (1, 2)
    assert r1["aggregated"] and sorted(r1["accepted"]) == ["0", "1", "evil"]
    assert ["ghost", "no valid update before the deadline"] in r1["failures"]
    assert [d for d, _ in r1["rejected"]] == ["evil"] * len(CASES)
    for (name, match, ack, _), (_, reason) in zip(outcomes, r1["rejected"],
                                                  strict=True):
        assert ack["reason"] == reason[:500], name
        assert re.search(match, reason), (name, reason)
    # the duplicate was counted once: bytes_up is the sum of the accepted updates
    sizes = re.findall(r"round 1: update from (\S+) accepted \((\d+) bytes", log)
    assert sorted(d for d, _ in sizes) == ["0", "1", "evil"]
    assert r1["bytes_up"] == sum(int(n) for _, n in sizes)
    assert r2["aggregated"] and sorted(r2["accepted"]) == ["0", "1", "evil"]
    assert r2["rejected"] == [["evil", stale_ack["reason"]]]
    assert np.isfinite(r2["eval"]["accuracy"])
