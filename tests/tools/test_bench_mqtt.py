"""``bench-mqtt`` on a tiny federation: 3 device processes, 1 round, 16 examples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import skip_or_fail
from sparsefedpp.tools.bench.mqtt_report import format_table
from sparsefedpp.tools.bench.mqtt_run import MqttBenchConfig, run_bench
from sparsefedpp.tools.mosquitto import find_binary

pytestmark = pytest.mark.mqtt


def test_three_devices_one_round(tmp_path, small_dataset):
    # Arrange
    if find_binary("mosquitto") is None:
        skip_or_fail("mosquitto not found; apt-get install mosquitto")
    cfg = MqttBenchConfig(devices=3, rounds=1, data=small_dataset, limit=16,
                          test_limit=50, timeout=120)
    lines = []

    # Act
    result = run_bench(cfg, tmp_path, lines.append)

    # Assert
    assert {"config", "rounds", "latency_s", "startup_s", "broker", "app", "aggregator",
            "devices", "machine", "wall_s"} <= result.keys()
    (r,) = result["rounds"]
    assert r["round"] == 1 and r["selected"] == 3 and r["accepted"] >= 2
    assert 0 < r["latency_s"] <= r["seconds"]
    lat = result["latency_s"]
    assert lat["median"] == lat["p95"] == r["latency_s"] and lat["p95_is_max"]
    b, app = result["broker"], result["app"]
    # the broker carries at least the updates in and the model fan-out out
    assert b["bytes_received"] >= app["bytes_up"] > 0
    assert b["bytes_sent"] >= app["bytes_down"] > 0
    assert b["bytes_received_per_round"] == b["bytes_received"]
    assert b["messages_received"] > 0 and b["messages_sent"] > 0
    assert b["peak_rss_mb"] > 0 and b["cpu_s"] >= 0
    agg = result["aggregator"]
    assert agg["exit_code"] == 0 and agg["cpu_s"] > 0 and agg["peak_rss_mb"] > 10
    assert 0 < agg["cpu_percent"] <= 100 * os.cpu_count()
    assert result["devices"]["peak_rss_mb_median"] > 10
    assert result["devices"]["exit_codes"] == [0]
    st = result["startup_s"]
    assert 0 < st["devices_online"] and 0 < st["first_round"] < result["wall_s"]
    assert any("round 1 announced" in line for line in lines)
    assert "round latency median" in format_table(result)
    # every process it started is gone (reaped, so no zombie either)
    assert set(result["pids"]) == {"broker", "aggregator", "device-0", "device-1",
                                   "device-2"}
    assert not [n for n, pid in result["pids"].items() if Path(f"/proc/{pid}").exists()]
