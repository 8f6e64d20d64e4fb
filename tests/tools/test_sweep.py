"""sparsefedpp sweep: a tiny grid runs, an interrupted sweep goes on where it
stopped, a finished one runs nothing, and the summary holds every point."""

from __future__ import annotations

import json

import pytest
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.tools import cli, cmd_report, simulate
from sparsefedpp.tools.metrics import read_metrics
from sparsefedpp.tools.sweep import check_common, grid

COMMON = ["--model", "resnet8", "--width", "0.25", "--data", "fashion-mnist",
          "--clients", "6", "--per-round", "3", "--rounds", "2", "--limit", "600",
          "--test-limit", "100", "--lr", "0.2", "--lr-end", "0.1", "--eval-sparsities"]


def _summary(out):
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def _sweep(out, *extra):
    return cli.main(["sweep", "--methods", "topk", "fedavg", "--sparsities", "0.9",
                     "--seeds", "0", "--out", str(out), *extra, "--", *COMMON])


def test_grid_has_one_dense_point_per_seed_and_refuses_bad_settings():
    points = grid(["sparsefedpp", "fedavg"], [0.99, 0.9], [0, 1])
    assert [p.name for p in points] == [
        "sparsefedpp-s0.9-seed0", "sparsefedpp-s0.99-seed0", "fedavg-s0-seed0",
        "sparsefedpp-s0.9-seed1", "sparsefedpp-s0.99-seed1", "fedavg-s0-seed1"]
    with pytest.raises(ConfigError, match="methods"):
        grid(["fedprox"], [0.9], [0])
    with pytest.raises(ConfigError, match="sparsities"):
        grid(["topk"], [1.0], [0])
    with pytest.raises(ConfigError, match="--seed"):
        check_common(["--rounds", "3", "--seed", "4"])


def test_an_interrupted_sweep_resumes_and_a_finished_one_runs_nothing(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    real = simulate.Simulation.run_round

    def interrupted(self, rnd):  # the first point stops after its first round
        if rnd == 1 and self.config.method == "topk":
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(simulate.Simulation, "run_round", interrupted)
    assert _sweep(out) == 130
    rows = _summary(out)
    assert [(r["method"], r["status"], r["rounds_done"]) for r in rows] == [
        ("topk", "unfinished", 1), ("fedavg", "new", 0)]

    monkeypatch.setattr(simulate.Simulation, "run_round", real)
    capsys.readouterr()
    assert _sweep(out) == 0
    err = capsys.readouterr().err
    assert "1 unfinished, 1 new" in err and "resuming after round 1" in err
    assert "time left" in err
    rows = _summary(out)
    assert [(r["method"], r["sparsity"], r["status"]) for r in rows] == [
        ("topk", 0.9, "finished"), ("fedavg", 0.0, "finished")]
    assert all(0 <= r["final"]["accuracy"] <= 1 for r in rows)
    assert "accuracy_pruned" in rows[0]["final"]
    events = read_metrics(out / "topk-s0.9-seed0" / "metrics.jsonl")
    assert [e["event"] for e in events] == ["start", "round", "resume", "round", "end"]

    calls = []
    monkeypatch.setattr(simulate.Simulation, "__init__",
                        lambda *a, **k: calls.append(a))
    assert _sweep(out) == 0
    assert calls == []  # everything finished: nothing built, nothing run
    assert "2 finished" in capsys.readouterr().err

    # results/ commits metrics, not checkpoints (*.npz is ignored): a finished
    # point without its resume.npz is still finished, and its metrics survive.
    for f in out.glob("*/*.npz"):
        f.unlink()
    kept = (out / "topk-s0.9-seed0" / "metrics.jsonl").read_bytes()
    assert _sweep(out) == 0
    assert calls == []
    assert "2 finished" in capsys.readouterr().err
    assert (out / "topk-s0.9-seed0" / "metrics.jsonl").read_bytes() == kept


def _row(method, sparsity, seed, acc, pruned, **config):
    c = {"method": method, "sparsity": sparsity, "model": "resnet8", "width": 1.0,
         "rounds": 2, "lda_alpha": 1.0, "seed": seed, "server_prune": False, **config}
    final = {"accuracy": acc} | ({} if pruned is None else {"accuracy_pruned": pruned})
    return cmd_report.summarize({"config": c, "rounds": [{"round": 1}, {"round": 2}],
                                 "end": {"final": final, "elapsed_seconds": 60.0}})


def test_report_gives_mean_and_spread_over_seeds_and_names_variants():
    rows = [_row("topk", 0.9, 0, 0.30, 0.28), _row("topk", 0.9, 1, 0.34, 0.32),
            _row("topk", 0.9, 0, 0.10, 0.10, server_prune=True),
            _row("fedavg", 0.0, 0, 0.40, None), _row("fedavg", 0.0, 1, 0.42, None),
            _row("topk", 0.99, 0, 0.2, 0.2, layer_floor=8)]

    text = cmd_report.table(rows)
    over_seeds = cmd_report.seed_table(rows)

    assert "| topk (server-prune) | 0.9 |" in text
    assert "| topk (floor 8) | 0.99 |" in text
    assert "| topk | 0.9 | resnet8 x1 | 2 | 2 | 0.3200 +- 0.0283 | 0.3000 +- 0.0283 |" \
        in over_seeds
    assert "| fedavg | 0 | resnet8 x1 | 2 | 2 | 0.4100 +- 0.0141 | 0.4100 +- 0.0141 |" \
        in over_seeds  # dense: accuracy at S is the accuracy
    # a run from before server_prune existed re-pruned the aggregate
    assert cmd_report.variant({"method": "topk"}) == "server-prune"
    assert cmd_report.variant({"method": "fedavg"}) == ""


def test_report_of_a_sweep_folder_lists_its_points(tmp_path):
    for name in ("topk-s0.9-seed0", "fedavg-s0-seed0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("")
    (tmp_path / "summary.jsonl").write_text("")
    got = cmd_report.expand([str(tmp_path), "other"])
    assert got == [str(tmp_path / "fedavg-s0-seed0"), str(tmp_path / "topk-s0.9-seed0"),
                   "other"]
