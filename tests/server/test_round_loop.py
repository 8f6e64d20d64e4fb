"""The round loop over a small in-memory transport: the quorum and deadline policy,
the one round record, the evaluation schedule and what the transport is told."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sparsefedpp.runtime.wire import codec
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.server.fedavg import FedAvg
from sparsefedpp.server.round_loop import (
    Arrivals,
    RoundLoop,
    RoundPolicy,
    Transport,
)
from sparsefedpp.server.strategy import ClientResult

LOGGER = "sparsefedpp.server.round_loop"


def start_model() -> dict:
    return {"w": np.zeros(4, np.float32)}


class Mailbox(Transport):
    """Clients in memory: client k answers the decoded model plus k + 1 with k + 1
    examples, through the wire codec. A client in ``late`` answers only from its
    ``late[k]``-th collect of the round on (a deadline passes after each collect);
    ``offline`` clients are not available and never answer; a client in ``drop``
    goes offline when it is announced to."""

    sender = "test"

    def __init__(self, clients, late=None, offline=(), drop=()):
        self.clients = list(clients)
        self.late = dict(late or {})
        self.offline = set(offline)
        self.drop = set(drop)
        self.log: list = []
        self.acked: list = []
        self.saves = 0

    def open(self, rnd):
        self.log.append(("open", rnd))
        self.collects, self.selected, self.answered = 0, [], {}

    def available(self):
        return [c for c in self.clients if c not in self.offline]

    def announce(self, rnd, attempt, plan, model):
        self.log.append(("announce", rnd, attempt, [p.client_id for p in plan]))
        self.selected, self.model, self.rnd = [p.client_id for p in plan], model, rnd
        self.offline |= self.drop & set(self.selected)

    def collect(self, deadline, quorum):
        self.collects += 1
        self.log.append(("collect", self.collects, quorum))
        msg = codec.decode(self.model)
        for c in self.selected:
            if c in self.answered or c in self.offline or \
                    self.late.get(c, 1) > self.collects:
                continue
            k = int(c)
            update = codec.Message("update", self.rnd, c, "fedavg",
                                   {"w": msg.tensors["w"] + np.float32(k + 1)}, k + 1,
                                   {"loss": float(k)})
            self.answered[c] = codec.encode(update, "dense")
        order = [c for c in self.selected if c in self.answered]
        results = [ClientResult(c, codec.decode(self.answered[c]).tensors,
                                codec.decode(self.answered[c]).num_examples,
                                codec.decode(self.answered[c]).meta) for c in order]
        failures = [(c, "no answer") for c in self.selected if c not in self.answered]
        return Arrivals(results, failures, [["9", "bad"]],
                        sum(len(self.answered[c]) for c in order))

    def acknowledge(self, rnd, counted):
        self.acked.append((rnd, list(counted)))

    def save_state(self):
        self.saves += 1


def make_loop(transport, *, per_round=3, quorum=2, **policy):
    events = []

    def emit(event, **fields):
        events.append((event, fields, transport.saves))

    strategy = FedAvg(per_round=per_round, min_clients=quorum, seed=0,
                      round_config=lambda rnd: {"lr": 0.5 / (rnd + 1)},
                      evaluate_fn=lambda t: {"mean": float(t["w"].mean())},
                      screen_median=0, screen_global=0)
    loop = RoundLoop(strategy, transport, start_model(),
                     policy=RoundPolicy(**{"rounds": 3, "quorum": quorum, **policy}),
                     method="fedavg", encoding="dense",
                     evaluate_fn=strategy.evaluate_global,
                     model_stats=lambda t: {
                         "global_sparsity": float(np.mean(t["w"] == 0)),
                         "nonzeros": {"w": int(np.count_nonzero(t["w"]))}},
                     emit=emit)
    return loop, events


def test_a_round_aggregates_records_once_and_tells_the_transport():
    transport = Mailbox(["0", "1", "2"])
    loop, events = make_loop(transport)

    record = loop.run_round(0)

    # clients 0, 1, 2 add 1, 2, 3 with weights 1, 2, 3: mean (1 + 4 + 9) / 6
    np.testing.assert_array_equal(loop.tensors["w"], np.full(4, 14 / 6, np.float32))
    assert record.round == 1 and record.attempts == 1 and record.aggregated
    assert sorted(record.selected) == ["0", "1", "2"] == sorted(record.accepted)
    assert record.lr == 0.5 and record.failures == []
    assert record.rejected == [["9", "bad"]]
    assert record.fit == {"loss": pytest.approx((0 + 2 + 6) / 6)}
    assert record.train_loss == pytest.approx(8 / 6)
    assert math.isnan(record.train_accuracy)
    assert record.global_sparsity == 0.0 and record.nonzeros == {"w": 4}
    assert record.eval == {"mean": pytest.approx(14 / 6)}  # eval_every 1
    model_bytes = len(codec.encode(codec.Message("model", 0, "test", "fedavg",
                                                 start_model()), "dense"))
    assert record.bytes_down == 3 * model_bytes
    assert record.bytes_up == sum(len(b) for b in transport.answered.values())
    assert transport.acked == [(0, record.accepted)]
    (event, fields, saves), = events
    assert event == "round" and saves == 1  # the state is saved before the event
    assert fields["clients"] == fields["selected"] == record.selected
    assert fields["cum_bytes_up"] == record.bytes_up == loop.totals["bytes_up"]
    assert loop.next_round == 1


def test_without_quorum_skip_keeps_the_model_and_counts_nothing(caplog):
    transport = Mailbox(["0", "1", "2"], late={"0": 9, "1": 9})
    loop, events = make_loop(transport, on_no_quorum="skip", max_attempts=3)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        record = loop.run_round(0)

    assert not record.aggregated and record.attempts == 1
    assert [e for e in transport.log if e[0] == "collect"] == [("collect", 1, 2)]
    np.testing.assert_array_equal(loop.tensors["w"], start_model()["w"])
    assert record.accepted == ["2"] and record.fit == {}
    assert sorted(record.failures) == [["0", "no answer"], ["1", "no answer"]]
    assert transport.acked == [(0, [])]
    assert "1 valid updates, quorum 2: keeping the previous global model" in caplog.text
    assert len(events) == 1


def test_extend_collects_again_until_the_late_client_answers(caplog):
    transport = Mailbox(["0", "1", "2"], late={"0": 2, "1": 3})
    loop, _ = make_loop(transport, on_no_quorum="extend", max_attempts=3,
                        round_timeout=0, extend_seconds=0)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        record = loop.run_round(0)

    assert record.aggregated and record.attempts == 1
    assert sorted(record.accepted) == ["0", "2"]  # quorum at the second collect
    assert transport.collects == 2 and "extending by 0 s" in caplog.text


def test_extensions_and_attempts_are_bounded_by_max_attempts():
    transport = Mailbox(["0", "1", "2"], late={"0": 99, "1": 99})
    loop, _ = make_loop(transport, on_no_quorum="extend", max_attempts=3,
                        round_timeout=0, extend_seconds=0)

    record = loop.run_round(0)

    assert transport.collects == 3 and not record.aggregated


def test_rerun_announces_again_to_the_clients_still_available(caplog):
    ids = ["0", "1", "2", "3"]
    first = FedAvg(per_round=2, seed=0).configure_round(0, ids)
    gone = first[0].client_id
    transport = Mailbox(ids, drop={gone})
    loop, _ = make_loop(transport, per_round=2, on_no_quorum="rerun", max_attempts=2,
                        round_timeout=0)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        record = loop.run_round(0)

    announced = [e for e in transport.log if e[0] == "announce"]
    assert [a[2] for a in announced] == [0, 1] and record.attempts == 2
    assert announced[0][3] == [p.client_id for p in first]
    assert gone not in announced[1][3] and record.selected == announced[1][3]
    assert record.aggregated and gone not in record.accepted
    assert "no quorum (1 of 2); announcing again" in caplog.text


def test_too_few_available_clients_skip_the_attempts_without_announcing():
    transport = Mailbox(["0"])
    loop, events = make_loop(transport, per_round=3, quorum=2, on_no_quorum="rerun",
                             max_attempts=2)

    record = loop.run_round(0)

    assert record.attempts == 2 and record.selected == [] and not record.aggregated
    assert not [e for e in transport.log if e[0] in ("announce", "collect")]
    assert record.bytes_down == 0 and len(events) == 1


def test_evaluation_every_n_rounds_and_the_full_evaluation_at_the_end():
    transport = Mailbox(["0", "1", "2"])
    loop, events = make_loop(transport, eval_every=2)

    loop.run()

    evals = [fields["eval"] for _, fields, _ in events]
    assert evals[0] == {} and set(evals[1]) == {"mean"}
    assert set(evals[2]) == {"mean"}  # FedAvg.evaluate without eval_sparsities
    assert [f["round"] for _, f, _ in events] == [1, 2, 3] and loop.next_round == 3
    assert events[-1][1]["cum_bytes_down"] == sum(f["bytes_down"] for _, f, _ in events)


@pytest.mark.parametrize("bad, match", [
    ({"quorum": 0}, "quorum"), ({"on_no_quorum": "wait"}, "on_no_quorum"),
    ({"round_timeout": -1}, "round_timeout"), ({"rounds": 1.5}, "rounds"),
])
def test_bad_policies_say_what_is_wrong(bad, match):
    with pytest.raises(ConfigError, match=match):
        RoundPolicy(**{"rounds": 3, **bad})
