"""The thin-link emulation of bench-link (tools/bench/link.py) with real sockets,
namespaces and a real federation: the relay's delay and byte count, tbf's rate,
random loss, teardown. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import skip_or_fail
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.tools import cli
from sparsefedpp.tools.bench.link import (
    DelayRelay,
    LinkSpec,
    ThinLink,
    namespaces,
    parse_rate,
    parse_seconds,
)

pytestmark = pytest.mark.mqtt


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=30).stdout


def need_root():
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")


class Sink:
    """A TCP server on 127.0.0.1 that echoes short messages and, for long ones,
    counts bytes and answers with the count once the sender half-closes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        total, data = 0, b""
        with conn:
            conn.settimeout(30)
            while True:
                b = conn.recv(65536)
                if not b:
                    break
                total += len(b)
                if total <= 64:
                    conn.sendall(b)          # echo a ping
                data = (data + b)[-64:]
            conn.sendall(str(total).encode())


CLIENT = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
t = time.monotonic(); s.sendall(b"ping"); assert s.recv(4) == b"ping"
rtt = time.monotonic() - t
t = time.monotonic(); s.sendall(bytes(range(256)) * (n // 256)); s.shutdown(1)
reply = b""
while True:
    b = s.recv(100)
    if not b: break
    reply += b
print(rtt, time.monotonic() - t, int(reply))
"""


def client(prefix, host, port, n):
    done = subprocess.run([*prefix, sys.executable, "-c", CLIENT, host, str(port),
                           str(n)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rtt, seconds, got = done.stdout.split()
    return float(rtt), float(seconds), int(got)


def test_specs_parse_and_refuse_nonsense():
    assert parse_rate("1mbit") == 1_000_000 and parse_rate("256kbit") == 256_000
    assert parse_rate("125kbps") == 1_000_000
    assert parse_seconds("100ms") == pytest.approx(0.1) and parse_seconds("0.2s") == 0.2
    for bad in ("fast", "1 parsec", "0"):
        with pytest.raises(ConfigError):
            parse_rate(bad)
    with pytest.raises(ConfigError):
        parse_seconds("soon")
    with pytest.raises(ConfigError):
        LinkSpec(loss=0.7)


def test_relay_delays_each_direction_and_passes_bytes_intact():
    sink = Sink()
    with DelayRelay(("127.0.0.1", 0), ("127.0.0.1", sink.port), 0.1) as relay:
        rtt, _, got = client([], "127.0.0.1", relay.port, 256 * 400)
        assert got == 256 * 400 + 4
        assert 0.2 <= rtt < 0.6          # 2 x 100 ms, plus scheduling
        time.sleep(0.2)
        assert relay.bytes_up == 256 * 400 + 4 and relay.connections == 1


def test_thin_link_limits_the_rate_and_leaves_nothing_behind():
    need_root()
    sink = Sink()
    before = set(namespaces())
    spec = LinkSpec(rate_bits=1_000_000, rtt_s=0.05)
    with ThinLink(spec) as link, DelayRelay((link.host_ip, 0), ("127.0.0.1", sink.port),
                                            spec.rtt_s / 2) as relay:
        assert link.netns in namespaces()
        rtt, seconds, got = client(link.prefix, link.host_ip, relay.port, 256 * 800)
        assert got == 256 * 800 + 4
        assert rtt >= 0.05
        # 204.8 kB at 1 Mbit/s is 1.64 s of payload alone; tbf's burst is ~12 kB
        assert seconds >= 1.4, seconds
        assert seconds < 6.0, seconds
        counts = link.counters()
        assert counts["device_tx_bytes"] >= 256 * 800
    assert set(namespaces()) == before
    assert link.host_if not in sh("ip", "-o", "link")


def test_loss_drops_packets_on_the_link_and_only_there():
    need_root()
    if not (shutil.which("iptables") or os.path.exists("/usr/sbin/iptables")):
        skip_or_fail("iptables missing: apt-get install iptables")
    with ThinLink(LinkSpec(rate_bits=10_000_000, rtt_s=0.0, loss=0.3)) as link:
        tag = link.netns
        assert tag in sh(*link.prefix, "iptables", "-S")
        assert tag in sh("iptables", "-S")
        recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        recv.bind((link.host_ip, 0))
        recv.settimeout(1.0)
        sent = 400
        sh(*link.prefix, sys.executable, "-c",
           ("import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for i in range({sent}):\n"
            f"    s.sendto(b'x', ('{link.host_ip}', {recv.getsockname()[1]}))\n"
            "    time.sleep(0.001)\n"))
        got = 0
        try:
            while True:
                recv.recv(16)
                got += 1
        except TimeoutError:
            pass
        recv.close()
        assert 0.55 * sent < got < 0.85 * sent, got   # 30 % dropped, binomial spread
    # the root namespace's rule went with the link
    assert tag not in sh("iptables", "-S")


def test_a_federation_runs_over_a_thin_link(tmp_path, small_dataset):
    need_root()
    before = set(namespaces())
    out = tmp_path / "rows.jsonl"
    code = cli.main(["bench-link", "--devices", "1", "--rounds", "2", "--limit", "16",
                     "--configs", "sparsefedpp:0.9", "--rate", "2mbit", "--rtt", "40ms",
                     "--data", small_dataset, "--out", str(out), "--quiet"])
    assert code == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["rounds"] == 2 and row["round_s_median"] > 0.04
    # after round 1 the global model is pruned: less comes down than the dense start
    assert 0 < row["later_app_down_bytes_per_round"] < row["app_down_bytes_per_round"]
    # the model went down and the update up through the veth
    assert row["wire_down_bytes_per_round"] >= row["app_down_bytes_per_round"]
    assert row["wire_up_bytes_per_round"] >= row["app_up_bytes_per_round"] > 0
    assert set(namespaces()) == before
