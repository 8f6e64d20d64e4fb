"""Tests for ``sparsefedpp bench``: an engine-only quick run, failing workers, the
report maths, and (torch extra) a quick run against PyTorch plus the guarantee
that both frameworks run the same model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import skip_or_fail
from sparsefedpp.runtime import models
from sparsefedpp.runtime.errors import ConfigError
from sparsefedpp.tools import cli
from sparsefedpp.tools.bench import procs as bench_procs
from sparsefedpp.tools.bench import report as bench_report
from sparsefedpp.tools.metrics import read_metrics

# --quick with the fewest steps, and batch 8 so that it stays fast on a busy machine
QUICK = ["bench", "--quick", "--repeats", "2", "--warmup", "1", "--rss-steps", "1",
         "--batch-size", "8"]
ROW_KEYS = {"event", "time", "model", "metric", "ours", "torch", "ratio", "target",
            "verdict"}
METRICS = {m for m, *_ in bench_report.MODEL_METRICS + bench_report.FIRST_STEP_METRICS}


def need_torch():
    """torch, or skip (a failure under CI=true, where the torch extra is installed)."""
    try:
        import torch
    except ImportError as err:
        skip_or_fail(f"torch is not importable ({err}); pip install -e .[torch]")
    return torch


def bench_rows(path) -> dict[str, dict]:
    return {r["metric"]: r for r in read_metrics(path) if r["event"] == "bench"}


def test_quick_ours_only_writes_bench_records(tmp_path, capsys):
    # Arrange
    path = tmp_path / "bench.jsonl"

    # Act
    code = cli.main([*QUICK, "--no-torch", "--quiet", "--metrics", str(path)])

    # Assert
    assert code == 0
    rows = bench_rows(path)
    assert set(rows) == METRICS
    for metric, row in rows.items():
        assert ROW_KEYS <= row.keys()
        assert row["model"] == "resnet8"
        assert row["ours"] > 0, metric
        assert row["torch"] is None and row["ratio"] is None
    assert rows["train_step_ms"]["verdict"] == "n/a"
    assert rows["first_step_process_s"]["verdict"] in ("met", "missed")
    # the parent's clock sees the whole process, so it covers the in-process time
    assert rows["first_step_process_s"]["ours"] >= rows["first_step_in_process_s"]["ours"]
    start = read_metrics(path)[0]
    assert start["event"] == "start" and start["threads"] == 2
    out = capsys.readouterr().out
    assert "train step (ms)" in out and "--no-torch" in out


def test_failing_workers_are_errors_with_exit_code_1(tmp_path, capsys):
    # Arrange: no worker can import numba in 50 ms
    path = tmp_path / "bench.jsonl"

    # Act
    code = cli.main([*QUICK, "--no-torch", "--quiet", "--timeout", "0.05",
                     "--metrics", str(path)])

    # Assert
    assert code == 1
    errors = [r for r in read_metrics(path) if r["event"] == "error"]
    assert {e["worker"] for e in errors} >= {"ours speed resnet8", "ours rss resnet8"}
    assert all("timed out" in e["message"] for e in errors)
    assert all(r["ours"] is None for r in bench_rows(path).values())
    assert "error: worker 'ours speed resnet8' failed: timed out" in capsys.readouterr().err


def test_parent_never_imports_torch():
    # Arrange: a fresh interpreter, since this test process may hold torch already
    code = ("import sys; from sparsefedpp.tools import cli, cmd_bench; "
            "cli.build_parser(); print('torch' in sys.modules)")

    # Act
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout

    # Assert
    assert out.strip() == "False"


def test_worker_error_names_exit_code_and_stderr_tail():
    # Act: argparse rejects the framework and exits 2
    run = bench_procs.run_worker("bad", ["speed", "--framework", "nope"],
                                 env=dict(os.environ), timeout=60)

    # Assert
    assert not run.ok and run.unavailable is None
    assert "exit code 2" in run.error and "invalid choice" in run.error


def test_torch_that_does_not_import_is_unavailable_not_an_error(tmp_path):
    # Arrange: a 'torch' package that shadows the real one and fails to import
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ImportError('simulated missing torch')\n")
    # (in front of any PYTHONPATH, which may be what makes this checkout importable)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))

    # Act
    run = bench_procs.run_worker("torch speed resnet8", ["speed", "--framework",
                                 "torch"], env=env, timeout=60)

    # Assert
    assert run.error is None and not run.ok
    assert "simulated missing torch" in run.unavailable


def test_worker_env_keeps_user_threads_unless_forced(monkeypatch):
    # Arrange
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "ARMV8")

    # Act
    env, used = bench_procs.worker_env(2, force=False)
    _, forced = bench_procs.worker_env(3, force=True)

    # Assert
    assert used["OPENBLAS_NUM_THREADS"] == "1" and used["NUMBA_NUM_THREADS"] == "2"
    assert env["OPENBLAS_CORETYPE"] == "ARMV8"
    assert set(forced.values()) == {"3"}


def test_rows_ratios_and_verdicts():
    # Arrange: torch twice as fast, ours at a third of its memory
    results = {}
    for fw, ms, mb, wall in (("ours", 20.0, 100.0, 2.0), ("torch", 10.0, 300.0, 5.0)):
        results[(fw, "speed", "resnet8")] = {"train_ms": [ms, ms, 3 * ms],
                                             "infer_ms": [ms / 4]}
        results[(fw, "rss", "resnet8")] = {"peak_rss_mb": mb,
                                           "rss_after_import_mb": mb / 2}
        results[(fw, "first-step", "resnet8")] = {"wall_s": wall, "in_process_s": 1.0}

    # Act
    rows = {r.metric: r for r in bench_report.build_rows(results, ("resnet8",))}
    markdown = bench_report.format_markdown(list(rows.values()))

    # Assert
    assert rows["train_step_ms"].ratio == pytest.approx(2.0)
    assert rows["train_step_ms"].verdict == "missed"
    assert rows["peak_rss_train_mb"].ratio == pytest.approx(1 / 3)
    assert rows["peak_rss_train_mb"].verdict == "met"
    assert rows["first_step_process_s"].verdict == "met"
    assert rows["inference_ms"].verdict == "missed"  # 2x torch
    assert rows["train_step_p90_ms"].verdict is None
    assert markdown.count("\n") == len(rows) + 1
    assert "| resnet8 | train step (ms) | 20.0 | 10.0 | 2.00x | <= 1.0x | missed |" \
        in markdown


@pytest.mark.parametrize("flags", [["--models", "cnn"], ["--repeats", "0"],
                                   ["--batch-size", "0"], ["--timeout", "0"]])
def test_bad_flags_are_config_errors(flags, capsys):
    # Act
    code = cli.main(["bench", "--no-torch", *flags])

    # Assert
    assert code == ConfigError.exit_code
    assert capsys.readouterr().err.startswith("error: --")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_torch_twin_runs_our_weights_to_the_same_logits(name):
    # Arrange
    torch = need_torch()
    from sparsefedpp.tools.bench import torch_models as bench_torch

    ours = models.build(name, seed=1)
    twin = bench_torch.from_state_dict(name, ours.state_dict()).eval()
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)

    # Act
    expected = ours.forward(x, train=False)
    with torch.inference_mode():
        got = twin(torch.from_numpy(x)).numpy()

    # Assert
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.torch
def test_quick_run_against_torch_computes_ratios(tmp_path):
    # Arrange
    need_torch()
    path = tmp_path / "bench.jsonl"

    # Act
    code = cli.main([*QUICK, "--quiet", "--metrics", str(path)])

    # Assert
    assert code == 0
    rows = bench_rows(path)
    for metric, row in rows.items():
        assert row["torch"] > 0, metric
        if "turn_ratios" in row:  # timed in turns: the median of paired ratios
            assert row["ratio"] == pytest.approx(np.median(row["turn_ratios"]))
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        else:
            assert row["ratio"] == pytest.approx(row["ours"] / row["torch"])
    assert {"train_step_ms", "inference_ms"} <= {m for m, r in rows.items()
                                                  if "turn_ratios" in r}
    assert rows["train_step_ms"]["verdict"] in ("met", "missed")
    assert rows["peak_rss_train_mb"]["verdict"] in ("met", "missed")
    check, = [r for r in read_metrics(path) if r["event"] == "check"]
    assert check["max_abs_logit_diff"] < 1e-4


def test_bench_memory_reports_each_phase(capsys):
    from sparsefedpp.tools import cli

    code = cli.main(["bench-memory", "--runs", "resnet8:0", "--batch-size", "4",
                     "--examples", "16", "--width", "0.5", "--no-torch", "--quiet",
                     "--format", "markdown"])

    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines()
               if line.startswith("| ours | resnet8 | 0 |"))
    cells = [c.strip(" *") for c in row.strip("|").split("|")]
    phases = [float(c) for c in cells[3:12]]
    assert phases[0] < phases[2] < phases[3]      # interpreter < numba < kernels
    assert 50 < phases[-1] < 400                  # the peak, in MB
