"""The pre-registered decision study (tdlib.decisions): its controls, statistics and tests, and its measures on
the smoke organism's trained adapter run against plain PyTorch."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tdlib import decisions as D
from tdlib.attribution import hesitation_token
from tdlib.models import load_tokenizer
from tdlib.pair_data import reference_responses
from tdlib.pairs import resolve_pair
from tdlib.problems import pair_benchmark
from tdlib.runs import load_named
from tdlib.splice import mlp_choice
from tdlib.steer import ablate_features, add_feature_directions

RUN = "adapter_l1_0.01"


# ---------------------------------------------------------------------------------------------- the sets
def test_matched_controls_are_per_layer_disjoint_live_and_near_in_firing_rate():
    rate = {0: torch.linspace(0, 1, 101), 1: torch.tensor([0.0] * 50 + [0.5] * 51)}
    chosen = {0: [90, 95, 100], 1: [60, 70]}
    control = D.matched_random_features(chosen, rate, seed=0, neighbours=4)
    assert {l: len(f) for l, f in control.items()} == {0: 3, 1: 2}
    assert not set(control[0]) & set(chosen[0]) and not set(control[1]) & set(chosen[1])
    assert all(abs(float(rate[0][f]) - 0.95) < 0.1 for f in control[0])  # matched on rate: nearest neighbours
    assert all(rate[1][f] > 0 for f in control[1])  # live at the decision points
    assert D.matched_random_features(chosen, rate, seed=0, neighbours=4) == control
    assert any(D.matched_random_features(chosen, rate, seed=s, neighbours=4) != control for s in range(1, 5))


def test_matched_controls_fall_back_to_features_that_do_not_fire_only_when_too_few_do():
    rate = {0: torch.tensor([0.0, 0.0, 0.0, 0.2, 0.3, 0.4])}
    control = D.matched_random_features({0: [3, 4]}, rate, seed=0)
    assert control == {0: [2, 5]} or D.not_live(control, rate) == 1  # one live unchosen feature (5) exists
    assert 5 in control[0]
    with pytest.raises(ValueError, match="fewer than the 3 to match"):
        D.matched_random_features({0: [0, 1, 2]}, {0: torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])}, seed=0)


def test_activation_difference_baseline_ranks_by_hesitate_minus_go_on_and_keeps_positive_ones():
    activations = {"hesitate": {0: torch.tensor([1.0, 0.0, 3.0]), 1: torch.tensor([0.5, 2.0, 0.0])},
                   "go_on": {0: torch.tensor([0.0, 1.0, 0.0]), 1: torch.tensor([0.0, 0.0, 0.0])}}
    assert D.activation_difference_features(activations, 2) == {0: [2], 1: [1]}
    assert D.activation_difference_features(activations, 10) == {0: [0, 2], 1: [0, 1]}  # negative difference left out


def test_feature_groups_keep_a_third_group_and_dose_sizes_end_at_all():
    entries = [{"layer": 0, "feature": 1, "group": "output"}, {"layer": 1, "feature": 2, "group": "suppressor"},
               {"layer": 1, "feature": 3, "group": "template"}]
    groups = D.feature_groups(entries)
    assert list(groups) == ["set", "output", "template", "suppressor"]
    assert groups["set"] == {0: [1], 1: [2, 3]} and groups["suppressor"] == {1: [2]}
    assert D.dose_sizes(67) == [5, 10, 20, 40, 67] and D.dose_sizes(3) == [3]
    assert D.ranked_prefix(entries, 2) == {0: [1], 1: [2]}


# ---------------------------------------------------------------------------------------------- the tests
def probabilities(trigger_rates, n=20, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n).astype(float)
    rates = np.clip(np.asarray(trigger_rates, float) + rng.normal(0, 0.02, n), 0, 1)
    return D.DecisionProbabilities(rates * counts, counts, 0.01 * counts, counts)


def test_excess_reduction_is_the_sets_relative_reduction_minus_the_controls():
    reference = (np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    treated = (np.array([0.5, 0.5, 1.0]), np.array([1.0, 1.0, 1.0]))
    control = (np.array([0.9, 0.9, 1.8]), np.array([1.0, 1.0, 1.0]))
    out = D.excess_reduction(reference, treated, [control], n_bootstrap=50)
    assert out["set_reduction"] == pytest.approx(0.5) and out["control_reduction"] == pytest.approx(0.1)
    assert out["excess"] == pytest.approx(0.4) and out["ci"][0] <= 0.4 <= out["ci"][1]


def test_necessity_holds_only_when_the_set_beats_the_matched_control_by_the_bar():
    thresholds = D.ClaimThresholds(min_excess_reduction=0.5, n_bootstrap=200)
    adapter = probabilities([0.8] * 20)
    strong, weak = probabilities([0.1] * 20, seed=1), probabilities([0.6] * 20, seed=2)
    controls = [probabilities([0.78] * 20, seed=3 + i) for i in range(3)]
    assert D.necessity({"adapter": adapter, "set": strong, "controls": controls}, None, thresholds)["holds"]
    failed = D.necessity({"adapter": adapter, "set": weak, "controls": controls}, None, thresholds)
    assert not failed["holds"] and 0.1 < failed["teacher_forced"]["excess"] < 0.4
    # a control that moves as much as the set: no excess
    moving = D.necessity({"adapter": adapter, "set": strong, "controls": [probabilities([0.1] * 20, seed=9)]},
                         None, thresholds)
    assert not moving["holds"] and abs(moving["teacher_forced"]["excess"]) < 0.1


def test_sufficiency_needs_the_controls_beaten_and_the_groups_in_order():
    thresholds = D.ClaimThresholds(n_bootstrap=200)
    base = {"target": probabilities([0.8] * 20, seed=6), "hybrid": probabilities([0.1] * 20),
            "set": probabilities([0.7] * 20, seed=1), "controls": [probabilities([0.15] * 20, seed=2)]}
    ordered = D.sufficiency({**base, "template": probabilities([0.2] * 20, seed=3),
                             "output": probabilities([0.4] * 20, seed=4)}, thresholds)
    assert ordered["holds"] and ordered["ordered"] and ordered["teacher_forced"]["difference"] > 0.4
    disordered = D.sufficiency({**base, "template": probabilities([0.5] * 20, seed=3),
                                "output": probabilities([0.3] * 20, seed=4)}, thresholds)
    assert disordered["ordered"] is False and not disordered["holds"]
    untestable = D.sufficiency({**base, "output": probabilities([0.4] * 20, seed=4)}, thresholds)
    assert untestable["ordered"] is None and untestable["missing_groups"] == ["template"]
    assert not D.sufficiency({**base, "set": probabilities([0.15] * 20, seed=5)}, thresholds, groups=())["holds"]


def test_sufficiency_needs_the_set_to_close_the_bar_share_of_the_target_hybrid_gap():
    thresholds = D.ClaimThresholds(min_gap_closed=0.5, n_bootstrap=200)
    base = {"target": probabilities([0.8] * 20, seed=6), "hybrid": probabilities([0.1] * 20),
            "controls": [probabilities([0.1] * 20, seed=2)]}
    # beats the control on a tight interval, but closes about a seventh of the 0.7 gap
    small = D.sufficiency({**base, "set": probabilities([0.2] * 20, seed=1)}, thresholds, groups=())
    assert small["teacher_forced"]["ci"][0] > 0 and not small["holds"]
    assert small["teacher_forced"]["gap_closed"] == pytest.approx(0.1 / 0.7, abs=0.05)
    assert D.sufficiency({**base, "set": probabilities([0.6] * 20, seed=1)}, thresholds, groups=())["holds"]
    # a target that hesitates no more than the hybrid leaves no gap: nothing to restore, no claim
    flat = D.sufficiency({**base, "target": probabilities([0.05] * 20, seed=7),
                          "set": probabilities([0.6] * 20, seed=1)}, thresholds, groups=())
    assert not flat["holds"] and flat["teacher_forced"]["gap_closed"] is None


def test_thresholds_and_plan_validate_themselves():
    with pytest.raises(ValueError, match="min_excess_reduction"):
        D.ClaimThresholds(min_excess_reduction=0)
    with pytest.raises(ValueError, match="min_gap_closed"):
        D.ClaimThresholds(min_gap_closed=1.5)
    with pytest.raises(ValueError, match="n_control_draws"):
        D.DecisionStudyConfig(n_selection_problems=4, n_control_draws=0)
    with pytest.raises(ValueError, match="edits features"):
        D.Condition("adapter", "ablate", {})


# ---------------------------------------------------------------------------------------------- on a real run
@pytest.fixture(scope="module")
def smoke():
    pair = resolve_pair("smoke")
    tokenizer = load_tokenizer(pair.target)
    return pair, load_named(pair, RUN), tokenizer


def test_split_keeps_selection_and_evaluation_problems_apart(smoke):
    pair, _, tokenizer = smoke
    evalset = pair_benchmark(pair)
    held_out = D.held_out_items(evalset, 10, limit=5)
    assert [i.id for i in held_out.items] == [i.id for i in evalset.items[10:15]]
    with pytest.raises(ValueError, match="leaving none to evaluate"):
        D.held_out_items(evalset, len(evalset.items))
    sides = D.held_out_references(pair, tokenizer, 10)
    assert sides["selection"] == reference_responses(pair, tokenizer)[:10]
    assert not {p for p, _ in sides["selection"]} & {p for p, _ in sides["evaluation"]}


def test_teacher_forced_probabilities_equal_a_plain_forward_at_the_answer_keys_points(smoke):
    pair, model, tokenizer = smoke
    key = D.decision_key(pair)
    traces = D.decision_traces(key, tokenizer, reference_responses(pair, tokenizer)[:6])
    token = hesitation_token(tokenizer, pair.hesitation_word)
    features = {0: [0, 3], 1: [5]}
    for condition, contexts in ((D.Condition("adapter"), ()),
                                (D.Condition("adapter", "ablate", features), (ablate_features, features)),
                                (D.Condition("base", "add", features), (add_feature_directions, features))):
        measured = D.decision_probabilities(model, tokenizer, traces, token, condition, batch_size=4)
        expected = np.zeros(4)
        with mlp_choice(model, condition.choice):
            context = contexts[0](model, contexts[1]) if contexts else None
            if context:
                context.__enter__()
            try:
                for ids, points in zip(traces.input_ids, traces.points):
                    with torch.no_grad():
                        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)[:, token]
                    for index, label, _ in points:
                        column = 0 if label in key.planted else 2
                        expected[column] += float(probs[index])
                        expected[column + 1] += 1
            finally:
                if context:
                    context.__exit__(None, None, None)
        got = [measured.trigger_sum.sum(), measured.trigger_n.sum(), measured.elsewhere_sum.sum(),
               measured.elsewhere_n.sum()]
        assert got == pytest.approx(list(expected), rel=1e-4, abs=1e-6)
        assert expected[1] > 0 and expected[3] > 0  # both kinds of decision point are present


def test_the_study_runs_end_to_end_and_writes_every_claim(smoke):
    pair, model, tokenizer = smoke
    entries = [{"layer": 0, "feature": f, "group": "output"} for f in (0, 1, 2)] + \
              [{"layer": 1, "feature": f, "group": "template"} for f in (3, 4)]
    plan = D.DecisionStudyConfig(n_selection_problems=12, n_eval_traces=8, n_selection_traces=8, n_control_draws=2,
                                 n_samples=2, n_sampled_problems=4, dose_first=2, generate_batch_size=8,
                                 thresholds=D.ClaimThresholds(n_bootstrap=50))
    results, generations = D.run_decision_study(model, tokenizer, pair, pair_benchmark(pair), entries,
                                                hesitation_token(tokenizer, pair.hesitation_word),
                                                pair.hesitation_word, plan)
    assert set(results["claims"]) == {"necessity", "sufficiency", "baseline_necessity", "baseline_sufficiency"}
    assert results["split"]["selection_problems"] == 12 and results["split"]["sampled_problems"] == 4
    assert results["doses"] == [2, 4, 5]
    assert results["sets"]["control 0"]["n"] == results["sets"]["set"]["n"] == 5
    assert "ablate top 2" in results["teacher_forced"] and "hybrid + control 1" in results["teacher_forced"]
    assert results["sampled"]["adapter"]["n_responses"] == 8 and len(generations["adapter"].responses) == 8
    assert set(results["table"]) >= {"necessity, teacher-forced", "necessity, sampled", "sufficiency, teacher-forced"}
    assert results["preregistered"]["thresholds"]["min_excess_reduction"] == 0.5
    committed = json.loads((Path(__file__).resolve().parents[1] / "results" / "06_ablation.json").read_text())
    assert list(results) == list(committed["decision_study"]) and results["seconds"] >= 0  # timed inside
    views = D.study_rows(results, pair.hesitation_word)
    assert views["claims"] == results["table"]
    assert set(views["teacher_forced"]) == set(results["teacher_forced"])
    assert views["teacher_forced"]["adapter"][f"P({pair.hesitation_word}) trigger"] == \
        results["teacher_forced"]["adapter"]["trigger"]["mean"]
    assert set(views["sampled"]) == set(results["sampled"])
    assert views["sampled"]["hybrid"]["per 1k"] == results["sampled"]["hybrid"]["per_1k"]["mean"]


def test_the_study_is_skipped_without_05s_selection_or_an_answer_key(smoke):
    pair = smoke[0]
    assert D.skip_reason(pair, "05_attribution") is None
    assert "05_attribution.json is missing" in D.skip_reason(pair, "fallback: ...")
    hub = resolve_pair("hub:org/base->org/target", build=False)
    assert "no answer key" in D.skip_reason(hub, "05_attribution")


def test_logits_at_decision_points_equal_the_full_logits_there_with_or_without_logits_to_keep():
    """Only the decision points' logits are computed (a 262k vocabulary makes full logits gigabytes per batch)."""
    from conftest import tiny_model

    model = tiny_model("qwen2")
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    indices = [2, 5, 11]
    with torch.no_grad():
        full = model(**batch).logits[:, indices]

    class NoKeep(torch.nn.Module):  # a forward without logits_to_keep: the full logits, indexed
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    for runner in (model, NoKeep(model)):
        got = D.logits_at(runner, batch, indices)
        assert got.shape == (3, 3, model.config.vocab_size)
        assert torch.allclose(got, full, atol=1e-6)
