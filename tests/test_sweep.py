"""Finished runs are reused when only memory settings changed, and trained again when the objective changed."""
import dataclasses
import json
import shutil

from tdlib.models import load_tokenizer
from tdlib.pair_data import data_for
import pytest
import torch

from tdlib.sweep import RunSpec, analysis_models, default_plan, local_mse_calibration, search_l1, sweep_checks, train_run
from tdlib.runs import RUN_FILE, DamagedRunError, load_named, run_dir


def test_a_run_written_before_the_memory_fields_is_loaded_and_a_changed_l1_is_retrained(smoke_runs, tmp_path):
    pair = smoke_runs
    plan = default_plan(pair)
    spec = plan.specs[0]
    shutil.copytree(run_dir(pair, spec.name), tmp_path / spec.name)
    info = json.loads((tmp_path / spec.name / RUN_FILE).read_text())
    for name in ("kl_chunk_tokens", "gradient_checkpointing"):
        info["train_config"].pop(name, None)
    (tmp_path / spec.name / RUN_FILE).write_text(json.dumps(info))

    lean = RunSpec(spec.name, dataclasses.replace(spec.config, kl_chunk_tokens=8, gradient_checkpointing=True,
                                                  checkpoint_every=5))
    _, result = train_run(pair, lean, data=None, root=tmp_path, progress=False)
    assert result is None  # loaded, not trained (there is no data to train on)

    changed = RunSpec(spec.name, dataclasses.replace(spec.config, l1_weight=spec.config.l1_weight * 2))
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    _, result = train_run(pair, changed, data, root=tmp_path, progress=False)
    assert result is not None and len(result.log) == changed.config.steps
    saved = json.loads((tmp_path / spec.name / RUN_FILE).read_text())["train_config"]
    assert saved["l1_weight"] == changed.config.l1_weight


@pytest.mark.parametrize("damage", ["truncated weights", "unreadable run.json"])
def test_a_damaged_run_is_reported_with_its_path_and_the_fix_and_retrained(smoke_runs, tmp_path, damage):
    pair = smoke_runs
    plan = default_plan(pair)
    spec = next(s for s in plan.specs if s.config.kind == "adapter")
    folder = tmp_path / spec.name
    shutil.copytree(run_dir(pair, spec.name), folder)
    broken = folder / ("adapters/adapters.safetensors" if damage == "truncated weights" else RUN_FILE)
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    with pytest.raises(DamagedRunError) as caught:
        load_named(pair, spec.name, tmp_path)
    message = str(caught.value)
    assert str(broken) in message and "Delete it" in message and str(folder) in message
    assert "SafetensorError" in message or "JSONDecodeError" in message  # the cause, named, not raised bare
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    _, result = train_run(pair, spec, data, root=tmp_path, progress=False)
    assert result is not None  # trained anew rather than failing deep inside a load
    load_named(pair, spec.name, tmp_path)


def _adapter(l1, l0, kl):
    return {"kind": "adapter", "l1_weight": l1, "l0": l0, "kl": kl}


def test_the_analysis_model_is_the_lowest_kl_adapter_with_l0_in_the_papers_range():
    models = {"hybrid": {"kind": "hybrid", "l0": None, "kl": 8.0}, "a": _adapter(1.0, 0.4, 3.0),
              "b": _adapter(0.3, 4.0, 1.0), "c": _adapter(0.1, 9.0, 0.5), "d": _adapter(0.01, 40.0, 0.05),
              "local_mse": {"kind": "local_mse", "l1_weight": 2.0, "l0": 5.0, "kl": 0.01}}
    chosen = analysis_models(models)
    assert chosen["analysis_model"] == "c" and chosen["analysis_in_range"]  # d is better but L0 40 is out of range
    assert chosen["lowest_penalty_model"] == "d" and "[1, 10]" in chosen["analysis_rule"]
    checks = sweep_checks(models)
    assert all(checks.values()) and "analysis adapter L0 in [1, 10]" in checks

    out_of_range = {"hybrid": models["hybrid"], "a": _adapter(1.0, 0.3, 3.0), "d": _adapter(0.01, 40.0, 0.05),
                    "e": _adapter(0.001, 60.0, 0.01)}
    chosen = analysis_models(out_of_range)
    # nearest on a log scale: 0.3 is 3.3x below 1, 40 is 4x above 10
    assert chosen["analysis_model"] == "a" and not chosen["analysis_in_range"]
    assert "no adapter" in chosen["analysis_rule"]
    assert not sweep_checks(out_of_range)["analysis adapter L0 in [1, 10]"]


def test_one_meaning_of_the_analysis_model_everywhere():
    """No second rule hides behind another word: the sweep and the notebooks speak of the analysis model."""
    from pathlib import Path

    import tdlib.sweep

    root = Path(tdlib.sweep.__file__).parents[1]
    for path in [Path(tdlib.sweep.__file__), *sorted((root / "notebooks").glob("*.ipynb"))]:
        assert "middle" not in path.read_text().lower(), path.name


def test_the_local_mse_l1_search_brackets_then_bisects_towards_the_target_l0():
    measured = []

    def l0_of(weight):  # L0 falls as the weight rises, as a sparsity penalty does
        measured.append(weight)
        return 50.0 / (1.0 + weight)

    trials = search_l1(l0_of, target=5.0, start=0.1, trials=6)  # exact answer: weight 9
    assert [t["l1_weight"] for t in trials][:3] == pytest.approx([0.1, 1.0, 10.0])  # x10 until bracketed
    assert 1.0 < trials[3]["l1_weight"] < 10.0  # then between the bracket
    best = min(trials, key=lambda t: abs(t["l0"] - 5.0))
    assert abs(best["l0"] - 5.0) < 1.0
    down = search_l1(lambda w: 50.0 / (1.0 + w), target=40.0, start=10.0, trials=3)
    assert [t["l1_weight"] for t in down][:2] == pytest.approx([10.0, 1.0])  # too sparse: step down


def test_the_sweep_trains_the_local_mse_transcoder_at_the_calibrated_l1(smoke_runs):
    pair = smoke_runs
    plan = default_plan(pair)
    assert "local_mse" not in [s.name for s in plan.specs] and plan.run_names[-1] == "local_mse"
    calibration = local_mse_calibration(pair)
    assert calibration is not None and len(calibration["trials"]) == plan.calibration_trials
    info = json.loads((run_dir(pair, "local_mse") / RUN_FILE).read_text())
    assert info["train_config"]["l1_weight"] == calibration["l1_weight"]
    assert calibration["l1_weight"] in [t["l1_weight"] for t in calibration["trials"]]


def test_the_studied_adapter_is_a_parameter():
    from tdlib.sweep import study_model

    train = {"analysis_model": "adapter_l1_0.03", "models": {
        "hybrid": {"kind": "hybrid"}, "adapter_l1_1": {"kind": "adapter", "l0": 0.02},
        "adapter_l1_0.3": {"kind": "adapter", "l0": 0.9}, "adapter_l1_0.03": {"kind": "adapter", "l0": 8.9}}}
    assert study_model(train) == "adapter_l1_0.03"
    assert study_model(train, "paper_l0") == "adapter_l1_0.3"  # L0 0.9 is nearest 1.4 on a log scale
    assert study_model(train, "adapter_l1_1") == "adapter_l1_1"
    with pytest.raises(ValueError, match="not among notebook 01's runs"):
        study_model(train, "adapter_l1_7")


def test_the_studied_adapter_is_loaded_by_the_name_notebook_01_chose(smoke_runs, tmp_path):
    """Notebooks 04-06 load the adapter they study in one call: the name ``study_model`` reads from notebook 01's
    results and the same run ``load_named`` loads."""
    from tdlib.results import write_results
    from tdlib.sweep import load_studied

    pair, run = smoke_runs, default_plan(smoke_runs).run_names[0]
    write_results("01_train", {"analysis_model": run, "models": {run: {"kind": "adapter", "l0": 2.0}}},
                  config=pair.name, results_dir=tmp_path)
    name, model = load_studied(pair, tmp_path)
    assert name == run
    reference = load_named(pair, run)
    ids = torch.arange(1, 9)[None]
    assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="not among notebook 01's runs"):
        load_studied(pair, tmp_path, "adapter_l1_7")
