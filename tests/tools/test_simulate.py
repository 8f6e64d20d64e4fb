"""End-to-end federations on real Fashion-MNIST: every method learns, and the uplink
shrinks as the sparsity rises. Small on purpose: ResNet-8 at half width, 3,200
images over 8 clients (LDA 1.0), 3 rounds of 4 clients, 500 test images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sparsefedpp.runtime import checkpoint
from sparsefedpp.runtime.sparsity import pruning
from sparsefedpp.tools import cli
from sparsefedpp.tools.metrics import read_metrics

COMMON = ["--model", "resnet8", "--width", "0.5", "--data", "fashion-mnist",
          "--clients", "8", "--per-round", "4", "--rounds", "3", "--limit", "3200",
          "--test-limit", "500", "--lr", "0.2", "--lr-end", "0.1", "--lda-alpha", "1.0",
          "--eval-sparsities", "0.9", "--quiet"]


def _simulate(tmp_path, name, *extra, common=COMMON):
    out = tmp_path / name
    assert cli.main(["simulate", *common, "--out", str(out), *extra]) == 0
    events = read_metrics(out / "metrics.jsonl")
    rounds = [e for e in events if e["event"] == "round"]
    return events, rounds, out


@pytest.mark.parametrize("method, sparsity", [("fedavg", "0"), ("topk", "0.7"),
                                              ("zerofl", "0.7"), ("sparsefedpp", "0.7")])
def test_each_method_learns(tmp_path, method, sparsity):
    events, rounds, out = _simulate(tmp_path, method, "--method", method,
                                    "--sparsity", sparsity)
    assert len(rounds) == 3
    final = events[-1]["final"]
    # 10 classes, chance 0.1 (a broken method stays there); measured after 3 rounds:
    # fedavg 0.45-0.54, topk 0.44, zerofl 0.36, sparsefedpp 0.41
    assert final["accuracy"] > 0.25, final
    assert "accuracy@0.9" in final
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    assert rounds[-1]["cum_bytes_up"] == sum(r["bytes_up"] for r in rounds)
    if sparsity != "0":  # the server does not re-prune: the union of client masks
        assert 0.0 < rounds[-1]["global_sparsity"] <= 0.7 + 0.002
        assert final["density"] == pytest.approx(1 - rounds[-1]["global_sparsity"])
        assert all("accuracy_pruned" in r["eval"] for r in rounds)
    else:
        assert "accuracy_pruned" not in final
    model, meta = checkpoint.load(out / "model.npz")
    assert meta["round"] == 3 and model.name == "resnet8"
    if sparsity != "0":  # the pruned copy holds exactly (1 - S) of the weights
        total = sum(la.weight.size for la in pruning.prunable_layers(model).values())
        assert sum(final["nonzeros_pruned"].values()) == round(0.3 * total)


def test_uplink_bytes_fall_as_sparsity_rises(tmp_path):
    up = {}
    for s in ("0.5", "0.9", "0.99"):
        _, rounds, _ = _simulate(tmp_path, f"topk{s}", "--method", "topk",
                                 "--sparsity", s, "--rounds", "1",
                                 "--eval-sparsities")
        up[s] = rounds[0]["bytes_up"]
    assert up["0.5"] > up["0.9"] > up["0.99"], up
    _, dense, _ = _simulate(tmp_path, "dense", "--method", "fedavg",
                                       "--rounds", "1", "--eval-sparsities",
                                       "--encoding", "dense")
    assert dense[0]["bytes_up"] > 4 * up["0.9"]


def test_config_file_and_workers(tmp_path):
    cfg = tmp_path / "sim.json"
    cfg.write_text(json.dumps({"method": "sparsefedpp", "sparsity": 0.8, "rounds": 2,
                               "workers": 2}))
    i = COMMON.index("--rounds")  # the file sets the rounds
    events, rounds, _ = _simulate(tmp_path, "cfg", "--config", str(cfg),
                                  common=COMMON[:i] + COMMON[i + 2:])
    start = events[0]
    assert start["config"]["workers"] == 2 and start["config"]["sparsity"] == 0.8
    assert len(rounds) == 2 and np.isfinite(rounds[-1]["train_loss"])


def test_bad_settings_give_one_line_errors(tmp_path, capsys):
    assert cli.main(["simulate", "--method", "fedprox", "--out", str(tmp_path)]) == 12
    assert "method" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rounds": 2, "colour": "red"}')
    assert cli.main(["simulate", "--config", str(bad), "--out", str(tmp_path)]) == 12
    assert "colour" in capsys.readouterr().err


def test_report_makes_a_table(tmp_path, capsys):
    _simulate(tmp_path, "a", "--method", "topk", "--sparsity", "0.9", "--rounds", "1")
    _simulate(tmp_path, "b", "--method", "fedavg", "--rounds", "1")
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "| topk | 0.9 |" in table and "| fedavg | 0 |" in table
    assert cli.main(["report", str(tmp_path / "nothing")]) == 12


# ------------------------------------------------- screening and poisoned federations
def test_default_screening_keeps_every_update_of_a_clean_federation(tmp_path):
    events, rounds, _ = _simulate(tmp_path, "clean", "--method", "sparsefedpp",
                                  "--sparsity", "0.7")

    assert events[0]["config"]["screen_median"] > 0  # on by default
    for r in rounds:
        assert r["failures"] == [], r["failures"]
        s = r["screening"]
        assert sorted(s["norms"]) == sorted(r["clients"]) and s["rejected"] == 0
        # measured here: at most 1.5 x the median, 0.6 x the global norm
        assert max(s["ratios"].values()) < 3
        assert s["bound"] > max(s["norms"].values())


def test_an_attacker_is_screened_out_and_the_robust_federation_learns(tmp_path):
    events, rounds, out = _simulate(tmp_path, "scale", "--method", "fedavg",
                                    "--attack", "scale", "--attackers", "2",
                                    "--aggregator", "trimmed-mean")

    config = events[0]["config"]
    assert (config["attack"], config["attackers"]) == ("scale", 2)
    assert config["aggregator"] == "trimmed-mean"
    poisoned = 0
    for r in rounds:
        rejected = {c for c, _ in r["failures"]}
        attackers = {c for c in r["clients"] if c in ("0", "1")}
        assert rejected == attackers, r["failures"]
        poisoned += len(attackers)
        assert all("exceeds the bound" in why for _, why in r["failures"])
    assert poisoned > 0  # the attackers were sampled at least once
    assert events[-1]["final"]["accuracy"] > 0.25
    model, _ = checkpoint.load(out / "model.npz")
    assert all(np.isfinite(v).all() for v in model.state_dict().values()
               if v.dtype.kind == "f")


def test_clipping_bounds_a_sign_flipper_that_passes_screening(tmp_path):
    # clients 0-2 attack; seed 0 samples client 2 in rounds 1 and 2
    events, rounds, _ = _simulate(tmp_path, "flip", "--method", "fedavg", "--attack",
                                  "signflip", "--attackers", "3", "--attack-scale", "2",
                                  "--aggregator", "clip", "--rounds", "2")

    assert all(r["failures"] == [] for r in rounds)  # 2 x is under the bound
    flipped = [r["screening"]["ratios"][c] for r in rounds for c in r["clients"]
               if c in ("0", "1", "2")]
    assert len(flipped) >= 2 and max(flipped) > 1  # larger than the median: clipped
    assert events[-1]["final"]["accuracy"] > 0.2


@pytest.mark.parametrize("flags, match", [
    (["--attack", "scale"], "attackers > 0"),
    (["--attackers", "2"], "attackers > 0"),
    (["--attack", "noise", "--attackers", "1"], "attack"),
    (["--attack", "scale", "--attackers", "99"], "attackers"),
    (["--attack", "scale", "--attackers", "1", "--attack-scale", "inf"], "attack_scale"),
    (["--aggregator", "krum"], "aggregator"),
    (["--aggregator", "trimmed-mean", "--trim", "0.5"], "trim"),
    (["--max-examples", "0"], "max_examples"),
])
def test_bad_robustness_settings_give_one_line_errors(tmp_path, capsys, flags, match):
    assert cli.main(["simulate", *COMMON, *flags, "--out", str(tmp_path)]) == 12
    assert match in capsys.readouterr().err


def test_bad_screening_ratio_is_a_config_error(tmp_path, capsys):
    assert cli.main(["simulate", *COMMON, "--screen-median", "0.5",
                     "--out", str(tmp_path)]) == 12
    assert "screen_median" in capsys.readouterr().err


def test_serve_takes_the_aggregator_but_not_the_attack(tmp_path):
    from sparsefedpp.runtime.errors import ConfigError
    from sparsefedpp.tools.cmd_serve import load_config

    dep = "[deployment]\ndevices = ['a']\nstate_dir = 's'\n"
    path = tmp_path / "fed.toml"
    path.write_text("[federation]\nper_round = 1\naggregator = 'median'\n"
                    "screen_median = 5.0\nmax_examples = 5000\n" + dep)
    sim, _ = load_config(str(path))
    assert (sim.aggregator, sim.screen_median, sim.max_examples) == ("median", 5.0, 5000)
    path.write_text("[federation]\nper_round = 1\nattack = 'scale'\nattackers = 1\n"
                    + dep)
    with pytest.raises(ConfigError, match="unknown keys \\['attack', 'attackers'\\]"):
        load_config(str(path))


# ------------------------------------------- issue 16: reference methods, resume
TINY = ["--model", "resnet8", "--width", "0.25", "--data", "fashion-mnist",
        "--clients", "8", "--per-round", "4", "--rounds", "4", "--limit", "800",
        "--test-limit", "200", "--lr", "0.2", "--lr-end", "0.05", "--eval-sparsities",
        "0.9", "--quiet"]


@pytest.mark.parametrize("method", ["fedavg", "topk", "zerofl", "sparsefedpp"])
def test_each_method_runs_two_rounds_on_a_tiny_model(tmp_path, method):
    flags = ["--method", method] + ([] if method == "fedavg" else ["--sparsity", "0.9"])
    events, rounds, _ = _simulate(tmp_path, method, *flags, "--rounds", "2",
                                  common=TINY)
    assert len(rounds) == 2 and all(np.isfinite(r["train_loss"]) for r in rounds)
    assert all(r["eval"]["accuracy"] >= 0 and "density" in r["eval"] for r in rounds)
    assert events[-1]["event"] == "end" and "accuracy@0.9" in events[-1]["final"]


def test_server_prune_is_an_option_and_off_by_default(tmp_path):
    _, plain, _ = _simulate(tmp_path, "plain", "--method", "topk", "--sparsity", "0.9",
                            "--rounds", "2", common=TINY)
    events, pruned, _ = _simulate(tmp_path, "pruned", "--method", "topk", "--sparsity",
                                  "0.9", "--rounds", "2", "--server-prune", common=TINY)
    assert events[0]["config"]["server_prune"] is True
    # clients upload 90 % sparse models; their average is denser unless re-pruned
    assert all(r["global_sparsity"] < 0.89 for r in plain)
    assert all(r["global_sparsity"] == pytest.approx(0.9, abs=1e-4) for r in pruned)
    # what goes down is the encoded global model: the denser one costs more
    assert plain[1]["bytes_down"] > pruned[1]["bytes_down"]


def test_layer_floor_keeps_every_layer_in_the_uploads_and_the_pruned_copy(tmp_path):
    events, rounds, _ = _simulate(tmp_path, "floor", "--method", "topk", "--sparsity",
                                  "0.99", "--layer-floor", "2", "--rounds", "1",
                                  "--eval-sparsities", common=TINY)
    assert events[0]["config"]["layer_floor"] == 2
    assert min(rounds[0]["nonzeros"].values()) >= 1  # the average of the uploads
    assert min(rounds[0]["eval"]["nonzeros_pruned"].values()) >= 2


def _comparable(events):
    """Round and end events without what depends on the clock."""
    out = []
    for e in events:
        if e["event"] in ("round", "end"):
            e = {k: v for k, v in e.items()
                 if k not in ("time", "seconds", "elapsed_seconds")}
            out.append(json.dumps(e, sort_keys=True))
    return out


def _final_tensors(out):
    with np.load(out / "resume.npz") as z:
        return {k: z[k] for k in z.files if k.startswith("tensor.")}


def test_resume_after_two_rounds_equals_four_rounds_straight(tmp_path, monkeypatch):
    from sparsefedpp.tools import simulate

    flags = ["--method", "sparsefedpp", "--sparsity", "0.8"]
    straight, _, out_a = _simulate(tmp_path, "straight", *flags, common=TINY)
    out_b = tmp_path / "resumed"
    real = simulate.Simulation.run_round

    def interrupted(self, rnd):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(simulate.Simulation, "run_round", interrupted)
    assert cli.main(["simulate", *TINY, *flags, "--out", str(out_b)]) == 130
    monkeypatch.setattr(simulate.Simulation, "run_round", real)
    with open(out_b / "metrics.jsonl", "ab") as f:  # a line torn by the crash
        f.write(b'{"event": "round", "round": 3, "lr": 0.')
    assert cli.main(["simulate", "--resume", str(out_b), "--quiet"]) == 0
    resumed = read_metrics(out_b / "metrics.jsonl")

    assert [e["event"] for e in resumed].count("resume") == 1
    assert _comparable(resumed) == _comparable(straight)
    a, b = _final_tensors(out_a), _final_tensors(out_b)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    # a finished run is left alone
    size = (out_b / "metrics.jsonl").stat().st_size
    assert cli.main(["simulate", "--resume", str(out_b), "--quiet"]) == 0
    assert (out_b / "metrics.jsonl").stat().st_size == size


def test_resume_refuses_another_configuration_and_names_the_field(tmp_path, capsys):
    _, _, out = _simulate(tmp_path, "run", "--method", "topk", "--sparsity", "0.9",
                          "--rounds", "1", common=TINY)
    capsys.readouterr()
    assert cli.main(["simulate", "--resume", str(out), "--rounds", "3",
                     "--lr", "0.3", "--quiet"]) == 12
    err = capsys.readouterr().err
    assert "rounds: saved 1, now 3" in err and "lr: saved 0.2, now 0.3" in err
    # the same flags again are fine (a sweep passes all of them)
    assert cli.main(["simulate", "--resume", str(out), *TINY, "--rounds", "1",
                     "--method", "topk", "--sparsity", "0.9"]) == 0


def test_resume_of_a_folder_without_a_finished_round_starts_over(tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "start", "command": "simul')
    assert cli.main(["simulate", "--resume", str(out), *TINY, "--method", "topk",
                     "--sparsity", "0.9", "--rounds", "1"]) == 0
    events = read_metrics(out / "metrics.jsonl")
    assert [e["event"] for e in events] == ["start", "round", "end"]
