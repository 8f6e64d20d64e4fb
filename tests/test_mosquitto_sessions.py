"""A device's credentials reach only that device's own MQTT session (issue 14).

The shipped config sets ``use_username_as_clientid`` on every listener: the broker
names each session after the login, whatever client id the client sends. So dev1,
connecting as "aggregator" or "dev2" (or the ids of before issue 14,
"sfpp-aggregator" and "sfpp-client-dev2"), with clean_start False or True, only
ever reaches dev1's own session: the connected aggregator and dev2 stay connected,
and messages queued for their offline durable sessions still reach them.

The same attacks against the config with the option off (as shipped before issue
14) kick the victim off and empty its queue (clean_start False: the queue is
delivered to dev1, whose ACL makes the broker drop it) or wipe its whole session
(clean_start True): the shipped-config test can fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from mosquitto import (
    TEST_USERS,
    Mosquitto,
    Probe,
    require_mosquitto,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.mqtt

# The client ids the victims send: the ids of issue 14 (= usernames) and the old ones.
VICTIM_IDS = {"ids=usernames": {"aggregator": "aggregator", "dev2": "dev2"},
              "old-ids": {"aggregator": "sfpp-aggregator", "dev2": "sfpp-client-dev2"}}
ATTACK_IDS = ["sfpp-aggregator", "aggregator", "dev2", "sfpp-client-dev2"]
# A topic each victim may write (for Probe.answers) and the queue its session holds.
PING = {"aggregator": "sfpp/server", "dev2": "sfpp/status/dev2"}
SUBSCRIPTION = {"aggregator": "sfpp/update/+", "dev2": "sfpp/ack/dev2"}
QUEUED = {"aggregator": ("sfpp/update/dev1", b"queued for the aggregator"),
          "dev2": ("sfpp/ack/dev2", b"queued for dev2")}


def expiry(seconds: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = seconds
    return properties


def durable(broker: Mosquitto, clients, client_id: str, user: str) -> Probe:
    """A victim's connection as the agents make it: clean_start False, 1 h expiry."""
    probe = clients(broker, client_id, user=user, clean_start=False,
                    properties=expiry(3600))
    assert probe.reason_code == "Success", probe.reason_code
    return probe


def sessions_of(user: str, broker: Mosquitto) -> set[str]:
    """The client ids under which the broker's log shows ``user`` connected."""
    log = broker.log_path.read_text(errors="replace")
    return {cid for cid, name in re.findall(
        r"New client connected from \S+ as (\S+) \(p\d, c\d, k\d+, u'([^']*)'\)",
        log) if name == user}


@dataclass
class Outcome:
    """What dev1's connection under a foreign client id did to the victims."""

    kicked: set[str] = field(default_factory=set)  # closed when dev1 connected
    stolen: dict[str, bytes] = field(default_factory=dict)  # what dev1 received
    session_lost: set[str] = field(default_factory=set)  # reconnected without one
    queue_lost: set[str] = field(default_factory=set)  # queued message not delivered


def attack(broker: Mosquitto, clients, victim_ids: dict[str, str], attack_id: str,
           clean_start: bool) -> Outcome:
    """dev1 connects as ``attack_id`` twice: while the victims are connected, and
    while they are offline with a message queued in each durable session."""
    outcome = Outcome()
    properties = None if clean_start else expiry(3600)  # False: keep what it takes

    def as_attacker() -> Probe:
        probe = clients(broker, attack_id, user="dev1", clean_start=clean_start,
                        properties=properties)
        assert probe.reason_code == "Success", probe.reason_code  # dev1 may log in
        return probe

    # 1. Online: both victims connected and subscribed, then dev1 connects.
    victims = {name: durable(broker, clients, victim_ids[name], name)
               for name in victim_ids}
    for name, probe in victims.items():
        probe.subscribe(SUBSCRIPTION[name])
    attacker = as_attacker()
    for name, probe in victims.items():
        if not probe.answers(PING[name]):
            outcome.kicked.add(name)
    attacker.close()
    for probe in victims.values():
        probe.close()

    # 2. Offline: one QoS 1 message queued in each victim's session (the
    # aggregator queues dev2's before it goes offline itself, dev1 the
    # aggregator's), then dev1 connects again.
    aggregator = durable(broker, clients, victim_ids["aggregator"], "aggregator")
    aggregator.subscribe(SUBSCRIPTION["aggregator"])
    aggregator.publish(*QUEUED["dev2"])
    aggregator.close()
    sender = clients(broker, "dev1", user="dev1")
    sender.publish(*QUEUED["aggregator"])
    sender.close()
    attacker = as_attacker()
    # Queued messages come right after the CONNACK, before this SUBACK.
    attacker.subscribe("sfpp/status/dev1")
    outcome.stolen = attacker.received(0, timeout=0)
    attacker.close()

    # 3. The victims come back as the agents do: resume, renew the subscription.
    for name in victim_ids:
        probe = durable(broker, clients, victim_ids[name], name)
        if not probe.session_present:
            outcome.session_lost.add(name)
        probe.subscribe(SUBSCRIPTION[name])  # again, queued messages come first
        topic, payload = QUEUED[name]
        if probe.received(0, timeout=0).get(topic) != payload:
            outcome.queue_lost.add(name)
    return outcome


@pytest.mark.parametrize("clean_start", [False, True], ids=["resume", "clean"])
@pytest.mark.parametrize("attack_id", ATTACK_IDS)
@pytest.mark.parametrize("victims", list(VICTIM_IDS))
def test_device_credentials_cannot_kick_take_over_or_wipe_another_session(
    secure_mosquitto, clients, victims, attack_id, clean_start
):
    outcome = attack(secure_mosquitto, clients, VICTIM_IDS[victims], attack_id,
                     clean_start)
    assert outcome == Outcome()
    # The broker named every connection of dev1 "dev1", whatever id it sent.
    assert sessions_of("dev1", secure_mosquitto) == {"dev1"}


@pytest.fixture
def broker_without_the_option(tmp_path, mosquitto_certs):
    """The shipped config with ``use_username_as_clientid false`` (before issue 14)."""
    require_mosquitto()
    with Mosquitto(tmp_path / "old", auth=True, tls=False, users=TEST_USERS,
                   certs=mosquitto_certs,
                   overrides={"use_username_as_clientid": False}) as broker:
        yield broker


@pytest.mark.parametrize("clean_start", [False, True], ids=["resume", "clean"])
@pytest.mark.parametrize(("victims", "victim"),
                         [(v, n) for v in VICTIM_IDS for n in ("aggregator", "dev2")])
def test_without_the_option_the_same_connect_kicks_and_steals_or_wipes(
    broker_without_the_option, clients, victims, victim, clean_start
):
    ids = VICTIM_IDS[victims]
    outcome = attack(broker_without_the_option, clients, ids, ids[victim], clean_start)
    # The victim whose id dev1 sent is kicked, and its queued message is gone:
    # resumed by dev1 (the session survives, emptied; the ACL keeps dev1 from
    # reading the message, the broker drops it on delivery) or wiped with the
    # whole session (clean).
    expected = Outcome(kicked={victim},
                       session_lost={victim} if clean_start else set(),
                       queue_lost={victim})
    assert outcome == expected
    assert sessions_of("dev1", broker_without_the_option) == {"dev1", ids[victim]}
    # Mosquitto 2.0.11 closes the old socket without a DISCONNECT 0x8E ("Session
    # taken over"), so paho reports only "Unspecified error": the victim cannot
    # tell a takeover from a network fault.
    log = broker_without_the_option.log_path.read_text(errors="replace")
    assert f"Client {ids[victim]} already connected, closing old connection." in log
