"""An emulated thin link for a device: a network namespace behind a shaped veth,
and a relay that adds the round-trip delay.

This kernel has no netem, so the three properties of a link come from three
places:

- **rate**: ``tc``'s token bucket (``tbf``) on both ends of a veth pair, so the
  uplink and the downlink are each limited to ``rate``;
- **delay**: :class:`DelayRelay`, a user-space TCP relay in the root namespace
  between the veth address and the broker on 127.0.0.1, which holds every chunk
  for half the round trip in each direction (in order, so TCP sees a longer path,
  not reordering);
- **loss**: ``iptables -m statistic --mode random`` drops on the receiving side
  of each direction (the namespace's INPUT for the downlink, the root
  namespace's INPUT on this veth only for the uplink; needs Debian's
  ``iptables``).

Everything needs root. Every name carries the creating process's pid
(``sfpp<pid>n<k>``), so concurrent runs do not collide, and :meth:`ThinLink.close`
(also on an exception, via ``with``) deletes the namespace, which deletes the veth
pair and its qdiscs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sparsefedpp.runtime.errors import ConfigError, TransportError

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(k|m|g)?(bit|bps)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$", re.IGNORECASE)
COMMAND_TIMEOUT = 10.0    # seconds for one ip/tc/iptables call
CHUNK = 16 * 1024         # bytes the relay reads at a time
QUEUE_CHUNKS = 64         # chunks in flight per direction (1 MiB): backpressure beyond


def parse_rate(text: str) -> int:
    """Bits per second from ``1mbit``, ``256kbit``, ``500000`` (bits)."""
    m = _RATE.match(str(text))
    if not m:
        raise ConfigError(f"link rate: expected e.g. 1mbit or 256kbit, got {text!r}")
    scale = {None: 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[
        (m.group(2) or "").lower() or None]
    bits = float(m.group(1)) * scale * (8 if (m.group(3) or "").lower() == "bps" else 1)
    if not 8_000 <= bits <= 10_000_000_000:
        raise ConfigError(f"link rate: expected 8 kbit/s to 10 Gbit/s, got {text!r}")
    return int(bits)


def parse_seconds(text: str) -> float:
    """Seconds from ``100ms``, ``0.1s`` or ``0.1``."""
    m = _TIME.match(str(text))
    if not m:
        raise ConfigError(f"link delay: expected e.g. 100ms, got {text!r}")
    value = float(m.group(1)) / (1000.0 if (m.group(2) or "").lower() == "ms" else 1.0)
    if not 0.0 <= value <= 10.0:
        raise ConfigError(f"link delay: expected 0 to 10 s, got {text!r}")
    return value


def require_root() -> None:
    """ConfigError unless this process can make namespaces (root) and has the tools."""
    if os.geteuid() != 0:
        raise ConfigError("thin link: expected root (network namespaces, veth and tc "
                          "need it), got uid %d; run as root" % os.geteuid())
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise ConfigError(f"thin link: expected the '{tool}' command, got none; "
                              "apt-get install iproute2")


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TransportError(f"thin link: {' '.join(argv)}: {err}") from None
    if done.returncode != 0:
        raise TransportError(f"thin link: {' '.join(argv)}: exit {done.returncode}: "
                             f"{done.stderr.strip()}")
    return done.stdout


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _run("ip", "-o", "-4", "addr", "show").splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _run("ip", "-4", "route", "show").splitlines():
        first = line.split()[0] if line.split() else ""
        if first and first != "default":
            try:
                nets.append(ipaddress.ip_network(first, strict=False))
            except ValueError:
                pass
    return nets


def _free_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A /30 in 10.207.0.0/16 that overlaps no address or route of this machine."""
    for net in ipaddress.ip_network("10.207.0.0/16").subnets(new_prefix=30):
        if not any(net.overlaps(t) for t in taken):
            return net
    raise TransportError("thin link: expected a free /30 in 10.207.0.0/16, got none")


@dataclass(frozen=True)
class LinkSpec:
    """What a link emulates: rate each way, round-trip delay, loss each way."""

    rate_bits: int = 1_000_000
    rtt_s: float = 0.1
    loss: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.loss < 0.5:
            raise ConfigError(f"link loss: expected a fraction in [0, 0.5), got "
                              f"{self.loss!r}")

    def describe(self) -> str:
        rate = (f"{self.rate_bits / 1e6:g} Mbit/s" if self.rate_bits >= 1_000_000
                else f"{self.rate_bits / 1e3:g} kbit/s")
        return (f"{rate}, {self.rtt_s * 1000:g} ms RTT"
                + (f", {self.loss:.0%} loss" if self.loss else ""))


class ThinLink:
    """One namespace behind one shaped veth pair (``with`` tears it down).

    ``host_ip`` is the root side (the relay listens there), ``device_ip`` the
    namespace side; ``prefix`` runs a command inside the namespace.
    """

    def __init__(self, spec: LinkSpec, index: int = 0):
        require_root()
        self.spec = spec
        tag = f"sfpp{os.getpid()}n{index}"
        self.netns, self.host_if, self.device_if = tag, f"{tag}h"[-15:], f"{tag}d"[-15:]
        self._made = False
        self._root_rule: list[str] | None = None
        self._open()

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def _open(self) -> None:
        net = _free_subnet(_used_networks())
        host, device = list(net.hosts())[:2]
        self.host_ip, self.device_ip = str(host), str(device)
        _run("ip", "netns", "add", self.netns)
        self._made = True
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
                 self.device_if)
            _run("ip", "link", "set", self.device_if, "netns", self.netns)
            _run("ip", "addr", "add", f"{host}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            inside = self.prefix
            _run(*inside, "ip", "addr", "add", f"{device}/30", "dev", self.device_if)
            _run(*inside, "ip", "link", "set", self.device_if, "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            # burst: at least one MTU-sized packet and ~10 ms of the rate; queue: 1 s
            burst = max(3200, self.spec.rate_bits // 8 // 100)
            for ns, dev in (([], self.host_if), (inside, self.device_if)):
                _run(*ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                     f"{self.spec.rate_bits}bit", "burst", str(burst), "latency",
                     "1000ms")
            if self.spec.loss:
                self._add_loss()
        except BaseException:
            self.close()
            raise

    def _add_loss(self) -> None:
        """Random drops on the receiving side of each direction (INPUT chains), so a
        lost packet is lost on the wire, not refused to its sender (an OUTPUT drop
        would fail the send with EPERM)."""
        iptables = shutil.which("iptables") or "/usr/sbin/iptables"
        if not os.path.exists(iptables):
            raise ConfigError("thin link loss: expected iptables (its statistic match "
                              "drops packets at random), got none; apt-get install "
                              "iptables")
        rule = ["-m", "statistic", "--mode", "random", "--probability",
                f"{self.spec.loss:.6f}", "-m", "comment", "--comment", self.netns,
                "-j", "DROP"]
        _run(*self.prefix, iptables, "-A", "INPUT", "-i", self.device_if, *rule)
        self._root_rule = ["INPUT", "-i", self.host_if, *rule]
        _run(iptables, "-A", *self._root_rule)

    def counters(self) -> dict[str, int]:
        """Bytes and packets through the veth, seen from the device side."""
        text = _run(*self.prefix, "cat", f"/sys/class/net/{self.device_if}/statistics/"
                    "tx_bytes", f"/sys/class/net/{self.device_if}/statistics/rx_bytes")
        tx, rx = (int(v) for v in text.split())
        return {"device_tx_bytes": tx, "device_rx_bytes": rx}

    def close(self) -> None:
        if self._root_rule:
            subprocess.run([shutil.which("iptables") or "/usr/sbin/iptables", "-D",
                            *self._root_rule], capture_output=True,
                           timeout=COMMAND_TIMEOUT)
            self._root_rule = None
        if self._made:
            self._made = False
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True,
                           timeout=COMMAND_TIMEOUT)
            # the veth goes with the namespace; a half-made pair may be left in root
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True,
                           timeout=COMMAND_TIMEOUT)

    def __enter__(self) -> ThinLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def namespaces() -> list[str]:
    """The network namespaces that exist now (for checks that none is left)."""
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines()
            if line.strip()]


class DelayRelay:
    """TCP relay from ``listen`` to ``target`` that delays each direction by
    ``one_way_s``: a chunk read at time t is written at t + one_way_s, in order.

    Runs an asyncio loop in a daemon thread; ``bytes_up`` / ``bytes_down`` count
    what it forwarded (device to broker / broker to device). Each direction holds
    at most ``QUEUE_CHUNKS`` chunks, so a slow reader pushes back on the sender
    instead of growing memory.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 one_way_s: float):
        self.target, self.one_way_s = target, float(one_way_s)
        self.bytes_up = self.bytes_down = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(listen,), daemon=True,
                                        name="delay-relay")
        self._thread.start()
        if not self._ready.wait(COMMAND_TIMEOUT) or self._error is not None:
            raise TransportError(f"delay relay on {listen}: {self._error or 'no start'}")

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def _main(self, listen: tuple[str, int]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, *listen))
        except OSError as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(*self.target), COMMAND_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_w, "up"),
                                 self._pipe(up_r, writer, "down"))
        except (OSError, asyncio.CancelledError):
            pass
        finally:  # a socket carries both directions: close it once both ended
            writer.close()
            up_w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if chunk is None:
                    break
                writer.write(chunk)
                await writer.drain()
                if direction == "up":
                    self.bytes_up += len(chunk)
                else:
                    self.bytes_down += len(chunk)
            if writer.can_write_eof():
                writer.write_eof()

        task = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(CHUNK)
                await queue.put((time.monotonic() + self.one_way_s, chunk or None))
                if not chunk:
                    break
            await task
        except BaseException:
            task.cancel()
            raise

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # let them close

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(COMMAND_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(COMMAND_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceLinks:
    """One ThinLink and DelayRelay per device, all to one broker port; the hook
    ``run_bench`` calls to place each device (``device_route``)."""

    def __init__(self, spec: LinkSpec, devices: Sequence[str], broker_port: int):
        self.spec, self.links, self.relays = spec, {}, {}
        try:
            for k, name in enumerate(devices):
                link = self.links[name] = ThinLink(spec, k)
                self.relays[name] = DelayRelay((link.host_ip, 0),
                                               ("127.0.0.1", broker_port),
                                               spec.rtt_s / 2)
        except BaseException:
            self.close()
            raise

    def route(self, device: str) -> tuple[list[str], str]:
        """(command prefix, broker URL) for a device's process."""
        link, relay = self.links[device], self.relays[device]
        return link.prefix, f"mqtt://{link.host_ip}:{relay.port}"

    def counters(self) -> dict[str, int]:
        """Sums over the devices: veth bytes (device side) and relayed bytes."""
        total = {"device_tx_bytes": 0, "device_rx_bytes": 0, "relay_up_bytes": 0,
                 "relay_down_bytes": 0}
        for name, link in self.links.items():
            for key, value in link.counters().items():
                total[key] += value
            total["relay_up_bytes"] += self.relays[name].bytes_up
            total["relay_down_bytes"] += self.relays[name].bytes_down
        return total

    def close(self) -> None:
        for relay in self.relays.values():
            relay.close()
        for link in self.links.values():
            link.close()
