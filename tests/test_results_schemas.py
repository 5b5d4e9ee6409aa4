"""Each notebook's results file is built by a function of the package: rebuilt from the committed organism results,
it has the committed keys in the committed order and the same values (notebook 05's: tests/test_attribution.py)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from tdlib.ablation import ablation_results
from tdlib.faithfulness import FaithfulnessConfig, faithfulness_results
from tdlib.pairs import resolve_pair
from tdlib.sweep import notebook_plan, train_results

RESULTS = Path(__file__).resolve().parents[1] / "results"


def committed(stem: str) -> dict:
    values = json.loads((RESULTS / f"{stem}.json").read_text())
    values.pop("config")
    return values


def test_01_train_results_are_rebuilt_from_the_runs():
    saved = committed("01_train")
    pair = resolve_pair("organism", build=False)
    plan = notebook_plan(pair)
    batches = [{"attention_mask": torch.ones(1, saved["n_validation_tokens"])}]
    rebuilt = train_results(pair, plan, saved["models"], batches)
    assert list(rebuilt) == list(saved)
    same = ("analysis_model", "analysis_rule", "analysis_in_range", "analysis_l0_range", "lowest_penalty_model",
            "checks", "plan", "n_validation_tokens", "text", "scored_positions")
    assert {k: rebuilt[k] for k in same} == {k: saved[k] for k in same}


def test_02_faithfulness_results_are_rebuilt_from_their_parts():
    saved = committed("02_faithfulness")
    evalset = SimpleNamespace(source="the organism's held-out problems", benchmark=saved["benchmark"])
    settings = FaithfulnessConfig(**saved["settings"])
    rebuilt = faithfulness_results(saved["models"], saved["subset_kl"], saved["subset_finding"], saved["subset_model"],
                                   saved["subset_plan"], evalset, saved["n_sequences"], saved["n_tokens"],
                                   saved["n_uncertain_tokens"], settings)
    assert list(rebuilt) == list(saved)
    assert {k: v for k, v in rebuilt.items() if k != "text"} == {k: v for k, v in saved.items() if k != "text"}
    assert rebuilt["text"].startswith("held-out prompts (") and rebuilt["text"].endswith("(on-policy)")


def test_06_ablation_results_are_rebuilt_from_the_study():
    saved = committed("06_ablation")
    first = list(saved).index("adapter_model")
    study = {k: saved[k] for k in list(saved)[:first]}
    features = {"all": {}, **{g: {} for g in saved["groups"]}}
    for entry in saved["features"]:
        features["all"].setdefault(entry["layer"], []).append(entry["feature"])
    stats = SimpleNamespace(n_pre_wait=saved["feature_stats"]["n_pre_wait_positions"],
                            n_tokens=saved["feature_stats"]["n_tokens"])
    items = [SimpleNamespace(id=saved["evaluation"]["first_evaluated"])] * saved["evaluation"]["evaluated_problems"]
    rebuilt = ablation_results(
        study, adapter_model=saved["adapter_model"], feature_source=saved["feature_source"], feature_sets=features,
        attribution={"mode": saved["attribution_mode"], "selection_rule": saved["selection_rule"]}, stats=stats,
        stats_batches=saved["feature_stats"]["batches"], stats_batch_size=saved["feature_stats"]["batch_size"],
        mechanisms=saved["mechanisms"], decision_study=saved["decision_study"],
        decision_study_skipped=saved["decision_study_skipped"], evalset=SimpleNamespace(items=items),
        n_selection_problems=saved["evaluation"]["selection_problems"], seconds=saved["seconds"])
    assert list(rebuilt) == list(saved)
    assert {k: v for k, v in rebuilt.items() if k != "groups"} == {k: v for k, v in saved.items() if k != "groups"}
