"""scripts/gpu_acceptance.py: its --cpu-tiny run (every section at tiny shapes, run once, in a subprocess where
nnsight, papermill and the other packages a GPU machine may lack cannot be imported), its refusal without a GPU, and
the halving of the training length on out-of-memory."""
import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

import pytest
import torch

import gpu_acceptance
from tdlib.attribution import MODES
from tdlib.generate import GREEDY_METHODS

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_A_GPU_MACHINE = ("nnsight", "papermill", "pandas", "matplotlib", "datasets")
RUN_BLOCKED = f"""
import sys
for name in {ABSENT_ON_A_GPU_MACHINE!r}:
    sys.modules[name] = None  # importing it now raises ImportError
sys.path[:0] = [{str(ROOT / "scripts")!r}, {str(ROOT)!r}]
import gpu_acceptance
status = gpu_acceptance.main(sys.argv[1:])
imported = [name for name in {ABSENT_ON_A_GPU_MACHINE!r} if sys.modules.get(name) is not None]
assert not imported, imported
sys.exit(status)
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("acceptance") / "acceptance.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", RUN_BLOCKED, "--cpu-tiny", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "section" in run.stdout and "wrote" in run.stdout  # the printed table
    return json.loads(out.read_text())


def test_every_section_runs_without_the_packages_a_gpu_machine_lacks(report):
    expected = {"train/paper-7b", "train/paper-1.5b", "attribution/paper-7b", "generate/paper-1.5b"}
    assert set(report["sections"]) == expected
    assert all(section["status"] == "ok" for section in report["sections"].values()), report["sections"]
    assert report["cpu_tiny"] and report["device"]["type"] == "cpu"


@pytest.mark.parametrize("pair", ["paper-7b", "paper-1.5b"])
def test_training_reports_speed_and_the_memory_forecast(report, pair):
    train = report["sections"][f"train/{pair}"]
    (attempt,) = train["attempts"]  # the tiny step fits at the first length
    assert attempt["fits"] and train["fits_tokens"] == attempt["tokens"] and train["stops_fitting_tokens"] is None
    for key in ("seconds_per_step", "tokens_per_s", "loss"):
        assert isinstance(attempt[key], Number) and attempt[key] > 0
    assert isinstance(attempt["forecast"]["gb"], Number) and "chunks" in attempt["forecast"]["strategy"]
    assert isinstance(train["forecast_fp32_adapters"]["gb"], Number)
    assert attempt["peak_allocated_gb"] is None  # measured on a GPU only


def test_the_three_decoding_paths_write_identical_tokens_and_are_timed(report):
    generation = report["sections"]["generate/paper-1.5b"]
    assert generation["check"]["identical_tokens"] is True and not generation["check"]["errors"]
    assert generation["check"]["first_divergence"] == {"compact": None, "continuous": None}
    assert generation["timed_check"]["identical_tokens"] is True
    assert generation["new_tokens"] == generation["requested_new_tokens"]
    assert set(generation["timed"]) == set(GREEDY_METHODS)
    for run in generation["timed"].values():
        assert run["tokens_per_s"] > 0 and run["vs_generate"] > 0
    lengths = generation["timed"]["generate"]["lengths"]
    assert lengths["min"] < lengths["max"] <= generation["new_tokens"]  # the stop rule ends rows at varied lengths


def test_first_divergence_is_the_first_token_where_two_responses_differ():
    assert gpu_acceptance.first_divergence("5 7 9", "5 7 9") is None
    assert gpu_acceptance.first_divergence("5 8 9", "5 7 9") == 1
    assert gpu_acceptance.first_divergence("5 7", "5 7 9") == 2  # one ended earlier


def test_every_attribution_mode_has_a_graph(report):
    graphs = report["sections"]["attribution/paper-7b"]["graphs"]
    assert list(graphs) == list(MODES) == report["modes"]
    for graph in graphs.values():
        assert graph["seconds"] > 0 and graph["active_features"] > graph["feature_nodes"] > 0  # the cap selected


def test_refuses_to_start_without_a_gpu_unless_cpu_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        gpu_acceptance.main(["--out", str(tmp_path / "none.json")])
    assert "no CUDA GPU" in str(refused.value.code) and "--cpu-tiny" in str(refused.value.code)
    assert not (tmp_path / "none.json").exists()


def test_the_training_length_is_halved_until_a_step_fits():
    attempts = gpu_acceptance.halving_attempts(10_000, lambda tokens: {"tokens": tokens, "fits": tokens <= 3000},
                                               gpu_acceptance.Budget(60))
    assert [a["tokens"] for a in attempts] == [10_000, 5000, 2500]
    assert gpu_acceptance.fit_summary(attempts) == {"fits_tokens": 2500, "stops_fitting_tokens": 5000}
    spent = gpu_acceptance.halving_attempts(10_000, lambda tokens: {"fits": False}, gpu_acceptance.Budget(0))
    assert spent == [{"tokens": 10_000, "skipped": "the time budget was spent"}]
