"""The measuring machinery of issue 15: turns between frameworks, paired ratios
and their spread, verdicts against the targets, the JSON-lines rows, the
persistent workers, and quick runs of bench-sparse, bench-memory and
profile_step on tiny settings."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
from sparsefedpp.tools import cli, cmd_bench_memory, cmd_bench_sparse
from sparsefedpp.tools.bench import procs as bench_procs
from sparsefedpp.tools.bench import profile_step
from sparsefedpp.tools.bench import report as bench_report
from sparsefedpp.tools.bench.timing import ratio_spread, take_turns, turn_ratios
from sparsefedpp.tools.metrics import read_metrics

TINY = ["--batch-size", "4", "--width", "0.25"]


class FakeWorkers:
    """Two 'frameworks' with known times: ours 2 ms, torch 4 ms, except that every
    call in turn 2 (a slow spell of the machine) takes 10x as long."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.base = {"ours": 2.0, "torch": 4.0}

    def turn(self, name: str, n: int) -> list[float]:
        turn_index = len(self.calls) // 2
        self.calls.append((name, n))
        slow = 10.0 if turn_index == 2 else 1.0
        return [self.base[name] * slow + 0.01 * i for i in range(n)]


def test_take_turns_rotates_the_order_and_splits_reps_into_blocks():
    fake = FakeWorkers()

    turns = take_turns(fake.turn, ["ours", "torch"], reps=7, block=2)

    assert fake.calls == [("ours", 2), ("torch", 2), ("torch", 2), ("ours", 2),
                          ("ours", 2), ("torch", 2), ("torch", 1), ("ours", 1)]
    assert [len(t) for t in turns["ours"]] == [2, 2, 2, 1]
    assert sum(len(t) for t in turns["torch"]) == 7


def test_paired_ratio_ignores_a_slow_spell_that_hits_both():
    fake = FakeWorkers()
    turns = take_turns(fake.turn, ["ours", "torch"], reps=10, block=2)

    ratios = turn_ratios(turns["ours"], turns["torch"])
    spread = ratio_spread(ratios)

    # every turn, slow or not, is ours/torch ~ 0.5; the medians of all times
    # would mix turns and still give 0.5, but the slowed turn must not move it
    assert len(ratios) == 5
    assert spread["ratio"] == pytest.approx(0.5, abs=0.01)
    assert spread["ratio_min"] <= spread["ratio_q1"] <= spread["ratio"]
    assert spread["ratio"] <= spread["ratio_q3"] <= spread["ratio_max"]
    assert spread["turns"] == 5


def test_ratio_spread_statistics_of_known_ratios():
    spread = ratio_spread([1.0, 2.0, 3.0, 4.0, 10.0])

    assert spread == {"ratio": 3.0, "ratio_min": 1.0, "ratio_max": 10.0,
                      "ratio_q1": 2.0, "ratio_q3": 4.0, "turns": 5}


def test_turn_ratios_need_matching_turns():
    with pytest.raises(ValueError, match="same number"):
        turn_ratios([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="returned 1 times"):
        take_turns(lambda name, n: [1.0], ["a"], reps=4, block=2)


@pytest.mark.parametrize("target, ours, ratio, verdict", [
    (bench_report.Target("ratio", 1.0, "<= 1.0x"), 5.0, 1.0, "met"),
    (bench_report.Target("ratio", 1.0, "<= 1.0x"), 5.0, 1.01, "missed"),
    (bench_report.Target("ratio", 1.0, "<= 1.0x"), 5.0, None, "n/a"),
    (bench_report.Target("ours", 3.0, "< 3 s"), 3.0, None, "missed"),
    (bench_report.Target("ours", 3.0, "< 3 s"), 2.9, 9.0, "met"),
    (bench_report.Target("ours", 250.0, "<= 250 MB"), 250.0, None, "met"),
])
def test_verdicts(target, ours, ratio, verdict):
    assert target.verdict(ours, ratio) == verdict


def test_the_issue_targets_are_all_there():
    t = bench_report
    assert t.SPARSE_TARGETS[("resnet18", 0.99)].limit == 0.2
    assert t.SPARSE_TARGETS[("resnet18", 0.999)].limit == 0.1
    assert t.SPARSE_TARGETS[("resnet8", 0.99)].limit == 0.4
    for model in ("resnet8", "resnet18"):
        assert t.TARGETS[(model, "train_step_ms")].limit == 1.0
        assert t.TARGETS[(model, "inference_ms")].limit == 1.0
    assert t.TARGETS[("resnet18", "peak_rss_train_mb")].limit == 0.6
    assert t.TARGETS[("resnet8", "first_step_process_s")].text == "< 3 s"
    assert t.MEMORY_TARGETS[("resnet18", 0.99)].limit == 250
    assert t.MEMORY_TARGETS[("resnet8", 0.99)].limit == 165
    assert t.MEMORY_TARGETS[("resnet18", 0.0)].on == "ratio"


def test_bench_rows_use_the_paired_median_and_keep_the_turns():
    # Arrange: torch slowed 4x in the last turn; the ratio of all medians would
    # say 2/4 = 0.5 or worse, the turns say 1.0 and 1.0 and 0.25
    ours = [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    torch = [[2.0, 2.0], [2.0, 2.0], [8.0, 8.0]]
    flat = {fw: {"train_ms": [t for ts in v for t in ts], "infer_ms": [1.0]}
            for fw, v in (("ours", ours), ("torch", torch))}
    results = {(fw, "speed", "resnet18"): rec for fw, rec in flat.items()}
    turns = {("ours", "train", "resnet18"): ours, ("torch", "train", "resnet18"): torch}

    # Act
    rows = {r.metric: r for r in bench_report.build_rows(results, ("resnet18",),
                                                          turns)}
    record = rows["train_step_ms"].record()

    # Assert
    assert record["ratio"] == pytest.approx(1.0)
    assert record["verdict"] == "met" and record["target"] == "<= 1.0x"
    assert record["turn_ratios"] == pytest.approx([1.0, 1.0, 0.25])
    assert record["ratio_min"] == pytest.approx(0.25)
    assert record["ours_turns_ms"] == ours and record["torch_turns_ms"] == torch
    json.dumps(record)  # JSON-ready
    assert rows["inference_ms"].ratio == pytest.approx(1.0)  # no turns: plain ratio
    assert "[0.25-1.00]" in bench_report.format_markdown(list(rows.values()))


def _sparse_record(macs: int, dense: int) -> dict:
    cost = {"macs_forward": macs, "macs_grad_input": macs, "macs_grad_weight": macs,
            "dense_macs_forward": dense, "dense_macs_grad_input": dense,
            "dense_macs_grad_weight": dense, "conv_linear_held_bytes": 1,
            "conv_linear_dense_held_bytes": 4, "held_bytes": 2, "dense_held_bytes": 4,
            "weight_csr_bytes": 1, "weight_dense_bytes": 2}
    return {"cost": cost, "peak_rss_mb": 100.0}


def test_bench_sparse_rows_shares_and_verdicts():
    # Arrange: dense 100 ms, 99 % 20 ms (torch 50 ms): 0.4x torch, 0.2 of dense
    # time for 0.01 of the MACs
    infer = {"infer": [[1.0]], "infer_dense": [[2.0]]}
    dense = cmd_bench_sparse.make_row(
        "resnet8", 0.0, _sparse_record(100, 100),
        {"ours": [[100.0], [100.0]], "torch": [[50.0], [50.0]]}, infer)
    sparse = cmd_bench_sparse.make_row(
        "resnet8", 0.99, _sparse_record(1, 100),
        {"ours": [[20.0], [20.0]], "torch": [[50.0], [50.0]]}, infer)

    # Act
    cmd_bench_sparse.add_shares([dense, sparse], [[100.0], [100.0]],
                                {0.0: [[100.0], [100.0]], 0.99: [[20.0], [20.0]]})

    # Assert
    assert sparse["vs_torch"] == pytest.approx(0.4)
    assert sparse["verdict"] == "met" and sparse["target"] == "<= 0.4x"
    assert dense["verdict"] == "missed"  # 2x torch
    assert sparse["mac_share"] == pytest.approx(0.01)
    assert sparse["time_share"] == pytest.approx(0.2)
    assert sparse["time_vs_mac"] == pytest.approx(20.0)
    assert sparse["infer_ratio"] == pytest.approx(0.5)
    json.dumps(sparse)


def test_bench_memory_verdicts_against_mb_and_torch():
    rows = [{"ok": True, "framework": "ours", "model": "resnet18", "sparsity": 0.99,
             "peak_mb": 240.0},
            {"ok": True, "framework": "ours", "model": "resnet18", "sparsity": 0.0,
             "peak_mb": 500.0},
            {"ok": True, "framework": "torch", "model": "resnet18", "sparsity": 0.0,
             "peak_mb": 700.0},
            {"ok": True, "framework": "ours", "model": "resnet8", "sparsity": 0.99,
             "peak_mb": 170.0, "width": 1.0}]

    cmd_bench_memory.verdicts(rows)

    assert rows[0]["verdict"] == "met" and rows[0]["target"] == "<= 250 MB"
    assert rows[1]["vs_torch"] == pytest.approx(500 / 700)
    assert rows[1]["verdict"] == "missed"  # 0.71x > 0.6x
    assert rows[2]["verdict"] is None
    assert rows[3]["verdict"] == "missed"


def test_serving_worker_answers_turns_then_its_final_record():
    env, _ = bench_procs.worker_env(1, force=True)
    worker = bench_procs.ServingWorker(
        "ours sparse", ["sparse", "--framework", "ours", "--model", "resnet8",
                        "--sparsity", "0.9", "--warmup", "0", *TINY],
        env=env, timeout=300)
    try:
        ready = worker.ready()
        train = worker.request("train", 2)
        dense = worker.request("infer_dense", 1)
        final = worker.close()
    finally:
        worker.kill()

    assert ready["ops"] == ["infer", "infer_dense", "train"]
    assert ready["cost"]["macs_forward"] < ready["cost"]["dense_macs_forward"]
    assert len(train) == 2 and all(t > 0 for t in train) and len(dense) == 1
    assert final["peak_rss_mb"] > 50 and final["task"] == "sparse"


def test_serving_worker_that_dies_is_a_failure_with_its_stderr():
    worker = bench_procs.ServingWorker(
        "bad", ["speed", "--framework", "ours", "--model", "nope"],
        env=dict(os.environ), timeout=120)

    with pytest.raises(bench_procs.WorkerFailed) as err:
        worker.ready()

    assert "exit code" in err.value.run.error
    assert "nope" in err.value.run.error  # the worker's own message


def test_quick_bench_sparse_has_a_row_per_point_with_ratios(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "sparse.jsonl"

    code = cli.main(["bench-sparse", "--models", "resnet8", "--sparsity", "0", "0.99",
                     "--repeats", "2", "--block", "1", "--warmup", "0", *TINY,
                     "--quiet", "--metrics", str(path)])

    assert code == 0
    rows = [r for r in read_metrics(path) if r["event"] == "bench"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.99]
    for r in rows:
        assert r["vs_torch"] == pytest.approx(np.median(r["turn_ratios"]))
        assert r["turns"] == 2 and len(r["ours_turns_ms"]) == 2
        assert r["verdict"] in ("met", "missed")
    assert rows[0]["time_share"] == pytest.approx(1.0)
    assert rows[1]["mac_share"] < 0.1 and rows[1]["time_vs_mac"] > 0
    out = capsys.readouterr().out
    assert "vs torch [min-max]" in out and "<= 0.4x" in out


def test_quick_bench_memory_phases_and_split(tmp_path, capsys):
    path = tmp_path / "memory.jsonl"

    code = cli.main(["bench-memory", "--runs", "resnet8:0.9", "--examples", "16",
                     "--batch-size", "8", "--width", "0.25", "--no-torch", "--quiet",
                     "--metrics", str(path), "--format", "markdown"])

    out = capsys.readouterr().out
    assert code == 0, out
    record, = [r for r in read_metrics(path) if r["event"] == "memory"]
    ph = record["phases_mb"]
    assert ph["interpreter"] < ph["framework"] < ph["kernels"] <= record["peak_mb"]
    assert record["weight_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert record["weights_mb"] > 0 and record["optimizer_mb"] == 0.0
    assert record["compiled"] == 0 and record["round_s"] > 0
    assert record["first_step_process_s"] > record["first_step_s"] > 0
    assert "| ours | resnet8 | 0.9 |" in out


def test_bench_memory_without_data_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(cmd_bench_memory, "FASHION_MNIST", "/nonexistent/fmnist")

    with pytest.raises(Exception, match="pass --data"):
        cmd_bench_memory.load_data(None)


def test_bench_memory_rejects_bad_runs():
    with pytest.raises(Exception, match="MODEL:S"):
        cmd_bench_memory.parse_runs(["resnet8:1.5"])
    assert cmd_bench_memory.parse_runs(["resnet18:0.99", "resnet8"]) == [
        ("resnet18", 0.99), ("resnet8", 0.0)]


def test_profile_step_splits_the_step_by_kind():
    result = profile_step.profile("resnet8", 0.99, 4, 2, width=0.25)

    kinds = {(k["kind"], k["phase"]) for k in result["kinds"]}
    assert ("BatchNorm", "forward") in kinds  # the downsample's, alone
    assert (profile_step.FUSED, "forward") in kinds
    assert (profile_step.FUSED, "backward") in kinds
    assert ("top-k/compress kept activations", "forward") in kinds
    assert ("conv/linear grad weight kernel", "backward") in kinds
    assert ("conv/linear forward kernel", "forward") in kinds
    assert all(k["ms"] >= 0 for k in result["kinds"]
               if not k["kind"].startswith("blocks"))
    assert sum(k["ms"] for k in result["kinds"]) < 3 * result["step_ms"]
    # the kernels are unwrapped again
    from sparsefedpp.runtime.kernels import conv
    assert not hasattr(conv.conv2d_forward, "__wrapped__")
    assert "| kind | phase | ms | share |" in profile_step.format_table(result,
                                                                        "markdown")


def test_bench_sparse_bad_flags(capsys):
    args = argparse.Namespace(models=["resnet8"], sparsity=[1.0], batch_size=1,
                              repeats=1, block=1, threads=1, warmup=0, width=1.0)
    with pytest.raises(Exception, match="--sparsity"):
        cmd_bench_sparse._check(args)


def test_bench_memory_optimizer_bytes_count_pattern_momentum_as_values():
    from sparsefedpp.runtime import losses, models
    from sparsefedpp.runtime.sparsity import pruning
    from sparsefedpp.tools.bench.memory_worker import optimizer_bytes

    model = models.build("resnet8", width=0.25, alpha=1.25, seed=0)
    pruning.prune(model, 0.99)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    _, g = losses.softmax_cross_entropy(model.forward(x, train=True), np.arange(2))
    model.backward(g, input_grad=False)  # the layers now train on their pattern
    dense = sum(p.nbytes for p in model.params().values())

    assert optimizer_bytes(model, 0.0) == 0
    assert 0 < optimizer_bytes(model, 0.9) < 0.5 * dense
    before = models.build("resnet8", width=0.25, alpha=1.25, seed=0)  # no step yet
    assert optimizer_bytes(before, 0.9) == dense
