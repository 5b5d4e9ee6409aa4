"""The intervention check at two scales, and the selection rule decided on held-out prompts: per-feature removals
in the real model equal a plain hooked forward, the split never shares a problem, and the comparison picks the
rule whose scores rank real removals and reports it on prompts the choice never saw."""
from types import SimpleNamespace

import pytest
import torch

from families import family_model, with_random_adapters
from tdlib import attribution as A
from tdlib.steer import ablate_features

from test_attribution import WordTokenizer

TOKEN = 5


@pytest.fixture(scope="module")
def model():
    return with_random_adapters(family_model("qwen2", seed=0), family_model("qwen2", seed=1), dtype=torch.float64)


def prompt(seed: int, problem: int, length: int = 12) -> A.HesitationPrompt:
    ids = torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return A.HesitationPrompt(ids, problem, 2)


def test_two_scale_check_in_jacobian_mode_tracks_small_removals(model):
    """The model's own first-order response (5% removals, divided by 0.05) against the graph's prediction: near
    perfect on a tiny model whose attention and norms barely move; full removals are reported beside it."""
    records = []
    for seed in range(3):
        graph = A.attribute(model, prompt(seed, seed).input_ids, TOKEN, mode="jacobian")
        records += [{**r, "prompt": seed} for r in A.intervention_records(model, graph, 10, small_fraction=0.05)]
    assert all(r["downstream_mlps"] == 2 - r["layer"] for r in records)
    report = A.two_scale_agreement(records, 0.05)
    assert set(report) == {"small", "full"} and report["small"]["n"] == report["full"]["n"] == len(records)
    small = report["small"]
    assert small["within_prompt_rank_correlation"] > 0.9 and small["sign_agreement"] > 0.9
    assert 0.8 < small["slope"] < 1.25
    assert sum(bin_["n"] for bin_ in small["by_downstream_mlps"].values()) == len(records)
    assert small["by_downstream_mlps"][">3"]["n"] == 0  # three layers: at most two base MLPs downstream


def test_removing_a_fraction_scales_the_activation(model):
    graph = A.attribute(model, prompt(0, 0).input_ids, TOKEN, mode="relp")
    nodes = list(range(4))
    tiny = A.removal_effects(model, graph, nodes, fraction=1e-4)
    full = A.removal_effects(model, graph, nodes)
    assert all(abs(t) < abs(f) for t, f in zip(tiny, full) if abs(f) > 1e-9)
    with pytest.raises(ValueError, match="fraction"):
        A.removal_effects(model, graph, nodes, fraction=0.0)


def test_calibration_slope_is_through_the_origin():
    assert A.calibration_slope([1.0, 2.0, -1.0], [0.5, 1.0, -0.5]) == pytest.approx(0.5)
    assert A.calibration_slope([0.0, 0.0], [1.0, 2.0]) != A.calibration_slope([0.0, 0.0], [1.0, 2.0])  # NaN


def test_split_by_problem_never_shares_a_problem():
    prompts = [prompt(i, problem) for i, problem in enumerate([0, 0, 1, 2, 2, 3, 4])]
    selection, evaluation = A.split_by_problem(prompts)
    assert selection == [0, 1, 2, 3, 4] and evaluation == [5, 6]  # problems 0-2 of 0-4 (half, rounded up)
    assert not {prompts[i].problem_index for i in selection} & {prompts[i].problem_index for i in evaluation}
    one = [prompt(i, 7) for i in range(3)]
    assert A.split_by_problem(one) == ([0, 1, 2], [])


def test_feature_removals_equal_a_plain_hooked_forward(model):
    prompts = [prompt(i, i) for i in range(2)]
    pool = [(0, f) for f in range(6)] + [(2, f) for f in range(6)]
    measured, active = A.feature_removals(model, prompts, pool, TOKEN, progress=False, batch_size=5)
    for n, p in enumerate(prompts):
        ids = torch.tensor(p.input_ids)[None]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            base = logits[TOKEN] - logits.mean()
            for column, (layer, feature) in enumerate(pool):
                if not active[n, column]:
                    assert measured[n, column] == 0
                    continue
                with ablate_features(model, {layer: [feature]}):
                    ablated = model(ids).logits[0, -1]
                assert float(measured[n, column]) == pytest.approx(float(ablated[TOKEN] - ablated.mean() - base),
                                                                   abs=1e-10)
    assert active.any() and not active.all()


def evidence(predictions: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(feature_predictions=predictions)


def test_compare_rules_picks_the_rule_that_ranks_real_removals():
    """Feature j's real effect is -j on every prompt: a mode that predicts it wins the cross-fit and the held-out
    test; one that predicts the reverse loses; verified, which measures it, ties the good mode."""
    n_prompts, pool = 8, [(0, j) for j in range(6)]
    prompts = [prompt(i, i) for i in range(n_prompts)]
    measured = -torch.arange(6, dtype=torch.float64).repeat(n_prompts, 1) * (1 + 0.1 * torch.rand(n_prompts, 6))
    active = torch.ones(n_prompts, 6, dtype=torch.bool)
    good = evidence([{key: -float(key[1]) for key in pool}] * n_prompts)
    reverse = evidence([{key: float(key[1]) for key in pool}] * n_prompts)
    selection, evaluation = A.split_by_problem(prompts)
    result = A.compare_rules({"reverse": reverse, "good": good}, prompts, measured, active, pool, selection,
                             evaluation)
    assert result["chosen"] in ("good", A.VERIFIED)
    assert result["rules"]["reverse"]["selection_cross_fit"] == pytest.approx(-1.0)
    assert result["rules"]["good"]["held_out"]["within_prompt_rank_correlation"] == pytest.approx(1.0)
    assert result["held_out_within_prompt_rank_correlation"] == pytest.approx(1.0)
    assert result["n_selection_prompts"] == 4 and result["n_evaluation_prompts"] == 4


def test_verified_features_keep_the_mass_of_measured_drops():
    pool = [(0, j) for j in range(4)]
    measured = torch.tensor([[-3.0, -1.0, 0.5, -0.01], [-3.0, -1.0, 0.5, -0.01]], dtype=torch.float64)
    assert A.verified_features(measured, pool, [0, 1], mass=0.7) == [(0, 0)]
    assert A.verified_features(measured, pool, [0, 1], mass=0.9) == [(0, 0), (0, 1)]
    assert A.verified_features(measured, pool, [0, 1], mass=1.0, min_drop=0.1) == [(0, 0), (0, 1)]


def test_the_study_keeps_evidence_from_the_selection_prompts_only(model):
    prompts = [prompt(i, i) for i in range(4)]
    config = A.StudyConfig(mode="jacobian", influence_mass=0.6, n_check_features=3)
    found = A.gather_evidence(model, WordTokenizer(), prompts, TOKEN, config, select_on=[0, 1], progress=False)
    assert len(found.per_prompt) == len(found.feature_predictions) == 4  # graphs and checks on every prompt
    assert {r["prompt"] for r in found.checks} == {0, 1, 2, 3}
    assert all(entry.prompts <= {0, 1} for entry in found.stats.values())  # evidence from the selection half
    study = A.summarize_evidence(found, model, WordTokenizer(), TOKEN)
    assert study["selection_prompts"] == [0, 1] and study["n_prompts"] == 4
    assert set(study["intervention_check"]["scales"]) == {"small", "full"}
    chosen = [(f["layer"], f["feature"]) for f in study["features"]][:2]
    forced = A.summarize_evidence(found, model, WordTokenizer(), TOKEN, selected=chosen)
    assert [(f["layer"], f["feature"]) for f in forced["features"]] == chosen
    with pytest.raises(ValueError, match="select_on"):
        A.gather_evidence(model, WordTokenizer(), prompts, TOKEN, config, select_on=[9], progress=False)


def test_gradient_rule_is_the_models_own_first_order_response(model):
    """Gradient x activation with nothing frozen predicts a tiny removal of each node in the real model: attention,
    norms, base MLPs and downstream features all respond, as they do in the model."""
    prompts = [prompt(i, i) for i in range(2)]
    found = A.gradient_evidence(model, prompts, TOKEN, prefix=1, select_on=[0], progress=False)
    assert all(pos >= 1 for nodes in found.node_predictions for (_, pos, _) in nodes)
    graph = A.attribute(model, prompts[1].input_ids, TOKEN, mode="frozen")
    # 0.1% removals: the models' norms compute in float32 even in a float64 model, so smaller steps drown in rounding
    records = A.intervention_records(model, graph, 8, min_position=1, small_fraction=1e-3)
    annotated = found.annotate([{**r, "prompt": 1} for r in records])
    for record in annotated:
        assert record["predicted_gradient"] == pytest.approx(record["actual_small"], rel=2e-2, abs=1e-5)
    per_feature = found.feature_predictions[1]
    layer, feature = records[0]["layer"], records[0]["feature"]
    nodes = {k: v for k, v in found.node_predictions[1].items() if (k[0], k[2]) == (layer, feature)}
    assert per_feature[(layer, feature)] == pytest.approx(sum(nodes.values()))
    assert found.top_features(3) and all(key in found.feature_predictions[0] for key in found.top_features(3))
