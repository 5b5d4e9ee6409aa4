"""Ablation and steering hooks (tdlib.steer) on the smoke organism's trained adapter run."""
import pytest
import torch

from tdlib.organism.traces import OrganismTraces
from tdlib.attribution import hesitation_token
from tdlib.problems import pair_benchmark
from tdlib.models import anatomy, load_tokenizer
from tdlib.organism.build import eval_problems, get_config
from tdlib.pairs import resolve_pair
from tdlib.splice import mlp_choice
from tdlib.ablation import (FALLBACK_SOURCE, AblationConfig, FeatureStats, collect_feature_stats, feature_sets_for,
                            example_responses, run_ablation_study, select_hesitation_features, summary_rows)
from tdlib.steer import (ablate_features, add_feature_directions, clamp_features, feature_contribution,
                         features_by_layer, features_from_attribution, n_chosen, random_features)
from tdlib.runs import load_adapters, load_named

RUN = "adapter_l1_0.01"


@pytest.fixture(scope="module")
def pair():
    return resolve_pair("smoke")


@pytest.fixture(scope="module")
def model(pair):
    return load_named(pair, RUN)


@pytest.fixture(scope="module")
def tokenizer(pair):
    return load_tokenizer(pair.target)


@pytest.fixture(scope="module")
def prompts():
    return [p.prompt for p in eval_problems(get_config("smoke"))[:6]]


def hook_counts(model):
    counts = []
    for layer in range(2):
        mlp = anatomy(model).mlp(layer)
        counts += [len(mlp._forward_hooks), len(mlp.adapter.features._forward_hooks)]
    return counts


class RecordFeatures:
    """Records every call's feature activations of every layer (one entry per forward, i.e. per decode step)."""

    def __init__(self, model):
        self.model, self.calls, self.handles = model, {0: [], 1: []}, []

    def __enter__(self):
        for layer in self.calls:
            self.handles.append(anatomy(self.model).mlp(layer).adapter.features.register_forward_hook(
                lambda m, a, out, layer=layer: self.calls[layer].append(out.detach().clone())))
        return self.calls

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def generate(model, tokenizer, prompts, max_new_tokens=12):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)


def active_features(model, tokenizer, prompts, per_layer=3) -> dict[int, list[int]]:
    """The features that fire most during an unablated generate (so ablating them is not vacuous)."""
    with mlp_choice(model, "adapter"), RecordFeatures(model) as calls:
        generate(model, tokenizer, prompts)
    chosen = {}
    for layer, outputs in calls.items():
        fired = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]).gt(0).float().mean(0)
        assert fired.max() > 0, "no feature fires in the smoke run; the test would be vacuous"
        chosen[layer] = sorted(fired.argsort(descending=True)[:per_layer].tolist())
    return chosen


def test_ablated_features_read_zero_during_generate(model, tokenizer, prompts):
    chosen = active_features(model, tokenizer, prompts)
    with mlp_choice(model, "adapter"):
        baseline = generate(model, tokenizer, prompts)
        with ablate_features(model, chosen), RecordFeatures(model) as calls:
            ablated = generate(model, tokenizer, prompts)
    for layer, outputs in calls.items():
        assert len(outputs) > 1, "generate should call the adapter once per decode step"
        stacked = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
        assert torch.all(stacked[:, chosen[layer]] == 0)
        others = [f for f in range(stacked.shape[-1]) if f not in chosen[layer]]
        assert stacked[:, others].gt(0).any(), "the other features must still fire"
    assert baseline.shape[0] == ablated.shape[0]


def test_hooks_removed_after_context_and_after_error(model, tokenizer, prompts):
    ids = tokenizer(prompts[:2], return_tensors="pt", padding=True)
    chosen = {0: [0, 1], 1: [2]}
    with mlp_choice(model, "adapter"), torch.no_grad():
        before, counts = model(**ids).logits, hook_counts(model)
        with ablate_features(model, chosen), clamp_features(model, {1: [5]}, 1.0):
            assert hook_counts(model) != counts
        assert hook_counts(model) == counts
        with pytest.raises(RuntimeError, match="boom"):
            with ablate_features(model, chosen), clamp_features(model, chosen, 2.0):
                raise RuntimeError("boom")
        assert hook_counts(model) == counts
        assert torch.equal(model(**ids).logits, before)
    with mlp_choice(model, "base"), pytest.raises(ValueError, match="boom"):
        with add_feature_directions(model, chosen):
            raise ValueError("boom")
    assert hook_counts(model) == counts


def test_clamp_sets_off_features_to_value_and_keeps_active_ones(model, tokenizer, prompts):
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    chosen = {0: list(range(0, 64, 4))}
    with mlp_choice(model, "adapter"), torch.no_grad():
        with RecordFeatures(model) as plain:
            model(**ids)
        with clamp_features(model, chosen, 3.25), RecordFeatures(model) as clamped:
            model(**ids)
    original, result = plain[0][0][..., chosen[0]], clamped[0][0][..., chosen[0]]
    assert (original > 0).any() and (original == 0).any(), "need both active and inactive entries"
    assert torch.equal(result[original > 0], original[original > 0])
    assert torch.all(result[original <= 0] == 3.25)
    others = [f for f in range(64) if f not in chosen[0]]
    assert torch.equal(clamped[0][0][..., others], plain[0][0][..., others])
    # per-feature values
    values = {0: [float(i + 1) for i in range(len(chosen[0]))]}
    with mlp_choice(model, "adapter"), torch.no_grad(), clamp_features(model, chosen, values), \
            RecordFeatures(model) as per_feature:
        model(**ids)
    result = per_feature[0][0][..., chosen[0]]
    expected = torch.tensor(values[0]).expand_as(result)
    assert torch.equal(result[original <= 0], expected[original <= 0])


def test_random_control_is_seeded_disjoint_and_matched():
    chosen = {0: [1, 2, 3], 2: [7]}
    first, again = random_features(chosen, 64, seed=3), random_features(chosen, 64, seed=3)
    assert first == again
    assert random_features(chosen, 64, seed=4) != first
    for layer, features in chosen.items():
        assert len(first[layer]) == len(features)
        assert not set(first[layer]) & set(features)
    alive = {0: torch.zeros(64, dtype=torch.bool), 2: torch.zeros(64, dtype=torch.bool)}
    alive[0][[10, 11, 12, 1]] = True
    alive[2][[20, 21]] = True
    drawn = random_features(chosen, 64, seed=0, alive=alive)
    assert drawn[0] == [10, 11, 12] and drawn[2][0] in (20, 21)
    with pytest.raises(ValueError, match="cannot draw"):
        random_features({0: list(range(40))}, 64, seed=0)


def test_transfer_steering_changes_target_and_nothing_at_zero(pair, model, tokenizer, prompts):
    ids = tokenizer(prompts[:3], return_tensors="pt", padding=True)
    chosen = {0: list(range(64)), 1: list(range(64))}
    with mlp_choice(model, "target"), torch.no_grad():
        target = model(**ids).logits
        with add_feature_directions(model, chosen, scale=0.0):
            assert torch.equal(model(**ids).logits, target)
        with add_feature_directions(model, chosen, scale=-0.5):
            steered = model(**ids).logits
    assert not torch.allclose(steered, target, atol=1e-4)
    # the same steering on the plain target model, adapters passed in, gives the same logits
    plain = load_named(pair, "target")
    with torch.no_grad(), add_feature_directions(plain, chosen, scale=-0.5, adapters=load_adapters(pair, RUN)):
        assert torch.allclose(plain(**ids).logits, steered, atol=1e-5)
    with mlp_choice(model, "adapter"), pytest.raises(ValueError, match="runs its adapter"):
        with add_feature_directions(model, chosen):
            pass


def test_all_features_added_to_base_mlp_reproduce_the_adapter_layer(model):
    mlp = anatomy(model).mlp(1)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    every = torch.arange(64)
    with torch.no_grad():
        rebuilt = mlp.base_mlp(x) + feature_contribution(mlp.adapter, x, every) + mlp.adapter.b_dec
        assert torch.allclose(rebuilt, mlp.base_mlp(x) + mlp.adapter(x).out, atol=1e-5)
        with mlp_choice(model, "base"), add_feature_directions(model, {1: every.tolist()}):
            assert torch.allclose(mlp(x) + mlp.adapter.b_dec, rebuilt, atol=1e-5)


def test_fallback_selector_ranks_features_by_pre_wait_selectivity(model, tokenizer):
    traces = OrganismTraces(tokenizer, "smoke", batch_size=8, seed=0, split="validation")
    stats = collect_feature_stats(model, [traces.batch(i) for i in range(2)], hesitation_token(tokenizer, " wait"))
    assert stats.n_pre_wait > 0 and stats.n_tokens > stats.n_pre_wait
    chosen = select_hesitation_features(stats, 5)
    assert 0 < n_chosen(chosen) <= 5
    scores = {(l, f): float(stats.pre_wait_mean[l][f] - stats.other_mean[l][f]) for l in chosen for f in chosen[l]}
    assert all(s > 0 for s in scores.values())
    best_outside = max(float(stats.pre_wait_mean[l][f] - stats.other_mean[l][f])
                       for l in stats.pre_wait_mean for f in range(64) if f not in chosen.get(l, []))
    assert min(scores.values()) >= best_outside
    clamp = stats.clamp_values(chosen)
    assert all(v >= 0 for row in clamp.values() for v in row)


def test_synthetic_stats_selection_and_attribution_groups():
    zeros = torch.zeros(4)
    stats = FeatureStats(pre_wait_mean={0: torch.tensor([0.0, 2.0, 0.5, 0.0]), 1: torch.tensor([3.0, 0, 0, 0])},
                         other_mean={0: torch.tensor([0.0, 0.1, 0.6, 0.0]), 1: torch.tensor([2.5, 0, 0, 0])},
                         fire_count={0: zeros, 1: zeros}, active_mean={0: zeros, 1: zeros}, n_pre_wait=3,
                         n_tokens=30)
    assert select_hesitation_features(stats, 5) == {0: [1], 1: [0]}  # feature 0/2 of layer 0: not positive
    assert select_hesitation_features(stats, 1) == {0: [1]}
    attribution = {"features": [{"layer": 1, "feature": 4, "group": "output", "influence": 1.0},
                                {"layer": 0, "feature": 2, "group": "template", "influence": 0.5},
                                {"layer": 1, "feature": 3, "group": "output", "influence": 0.2}]}
    sets = features_from_attribution(attribution)
    assert sets == {"all": {0: [2], 1: [3, 4]}, "output": {1: [3, 4]}, "template": {0: [2]}}
    attribution["analysis_model"] = "adapter_a"
    assert feature_sets_for(attribution, "adapter_a", stats) == (sets, "05_attribution")
    with pytest.raises(ValueError, match="selected features of 'adapter_a', this run studies 'adapter_b'"):
        feature_sets_for(attribution, "adapter_b", stats)
    assert stats.n_features == 8
    fallback, source = feature_sets_for(None, "adapter_b", stats, fallback_share=0.25)  # 8 features: 2 of them
    assert fallback == {"all": {0: [1], 1: [0]}} and source == FALLBACK_SOURCE
    assert features_by_layer([(1, 2), (1, 2), (0, 5)]) == {0: [5], 1: [2]}
    with pytest.raises(ValueError, match="no 'features'"):
        features_from_attribution({"features": []})


def test_run_ablation_study_on_smoke(pair, model, tokenizer):
    traces = OrganismTraces(tokenizer, "smoke", batch_size=8, seed=0, split="validation")
    stats = collect_feature_stats(model, [traces.batch(0)], hesitation_token(tokenizer, " wait"))
    chosen = select_hesitation_features(stats, 4)
    output, template = {k: v[:1] for k, v in chosen.items()}, {k: v[1:] for k, v in chosen.items()}
    sets = {"all": chosen, "output": output, "template": template}
    evalset = pair_benchmark(pair, limit=4, max_new_tokens=8)
    results, generations = run_ablation_study(
        model, tokenizer, evalset, sets, stats,
        AblationConfig(word=" wait", n_random_draws=2, transfer_scales=(-0.5, 0.0), batch_size=4))
    for key in ("adapter", "ablated", "ablated_output"):
        assert set(results[key]) >= {"wait_rate", "wait_per_1k_tokens", "mean_response_tokens", "accuracy",
                                     "wait_per_1k_tokens_ci", "mean_response_tokens_ci"}
        low, high = results[key]["mean_response_tokens_ci"]
        assert low <= results[key]["mean_response_tokens"] <= high
    control = results["random_control"]
    assert control["n_draws"] == 2 and control["seeds"] == [0, 1] and "wait_per_1k_tokens_std" in control
    assert {"hybrid", "hybrid_plus_template", "hybrid_plus_output", "hybrid_plus_features", "target",
            "target_steered_-0.5"} <= set(results["steered"])
    assert "adapter_clamped" not in results["steered"]  # clamped variants only when asked for
    assert results["set_sizes"]["both"] == n_chosen(chosen) == results["n_features_chosen"]
    # steering with scale 0 reproduces the target's generations exactly
    assert generations["target_steered_0"].responses == generations["target"].responses
    # ablating nothing more than the output group is a different condition from ablating both groups
    assert set(generations) >= {"ablated_output", "ablated", "random_0", "random_1"}
    assert all(isinstance(v, bool) for v in results["checks"].values())
    assert (results["benchmark"], results["n_problems"], results["max_new_tokens"]) == ("organism", 4, 8)
    rows = summary_rows(results)
    assert list(rows)[:4] == ["adapter", "ablated: output", "ablated: both groups", "random control (mean)"]
    assert {"hybrid", "target_steered_-0.5"} <= set(rows) and "notes" not in rows
    assert rows["ablated: both groups"]["wait_per_1k_tokens"] == results["ablated"]["wait_per_1k_tokens"]
    assert rows["adapter"]["wait_per_1k_tokens 95%"] == results["adapter"]["wait_per_1k_tokens_ci"]
    shown = example_responses(evalset, generations, -0.5, n=2, width=20).splitlines()
    assert shown[0] == f"{evalset.items[0].question} answer {evalset.items[0].answer}"
    assert shown[1] == f"  {'adapter':>22}:{generations['adapter'].responses[0][:20]}"
    assert sum(line.strip().startswith("target_steered_-0.5:") for line in shown) == 2
    assert not any("clamped" in line for line in shown)

    from tdlib.plots import ablation_figure
    fig = ablation_figure(results, word="wait")
    wait_axis = fig.axes[0]
    shown = {"adapter_clamped", "hybrid", "hybrid_plus_template", "hybrid_plus_output", "hybrid_plus_features",
             "hybrid_plus_features_clamped", "target"}
    n_bars = 4 + sum(k in shown or k.startswith("target_steered") for k in results["steered"])
    assert len(wait_axis.patches) == len(wait_axis.get_xticklabels()) == n_bars
    assert "paper 5.5" in [t.get_text() for t in wait_axis.texts]  # the paper's numbers recorded in the results
    without_paper = ablation_figure({k: v for k, v in results.items() if k != "paper"}, word="wait")
    assert not without_paper.axes[0].texts


def test_no_groups_means_one_set_and_no_group_conditions(pair, model, tokenizer):
    from tdlib.ablation import study_sets
    from tdlib.steer import union

    assert union({0: [1, 3]}, {0: [2], 2: [5]}) == {0: [1, 2, 3], 2: [5]}
    sets = study_sets({"all": {0: [4]}, "suppressor": {0: [4]}})
    assert sets["both"] == {0: [4]} and sets["output"] == {}
    sets = study_sets({"all": {0: [1, 2, 4]}, "output": {0: [1]}, "template": {0: [2]}, "suppressor": {0: [4]}})
    assert sets["both"] == {0: [1, 2]}, "suppressors lower the word: they are not part of 'both groups'"


def test_wait_metrics_count_the_pairs_word_with_intervals():
    from tdlib.generate import Generation
    from tdlib.ablation import wait_metrics

    generation = Generation(["q"] * 3, ["Hmm, 2. hmm", "4", "Hmm wait"], [10, 10, 20])
    metrics = wait_metrics(generation, word="Hmm")
    assert metrics["n_wait"] == 3 and metrics["wait_per_1k_tokens"] == pytest.approx(75.0)
    low, high = metrics["wait_per_1k_tokens_ci"]
    assert low <= 75.0 <= high and high > low
    assert wait_metrics(generation, word="wait")["n_wait"] == 1


def test_mechanism_checks_read_each_mechanisms_own_rate():
    from tdlib.organism.ablation import mechanism_checks, mechanism_rates, mechanism_summary

    def condition(**rates):
        full = {"crossing": 0.0, "repeat": 0.0, "slip": 0.0, "period": 0.0, "none": 0.0, "hesitation": 0.0, **rates}
        return {"accuracy": 1.0, "mean_response_tokens": 50.0,
                "mechanisms": {m: {"per_1k_tokens": v, "per_1k_tokens_ci": [v, v], "count": 1} for m, v in full.items()}}

    study = {"adapter": condition(crossing=10, slip=8, period=20), "hybrid": condition(crossing=1, period=0),
             "sets": {"crossing": {"ablated": condition(crossing=2, slip=7, period=20),
                                   "random": [condition(crossing=9, slip=8, period=20)] * 2,
                                   "hybrid_plus": condition(crossing=4)},
                      "slip": {"ablated": condition(crossing=3, slip=1, period=20),
                               "random": [condition(crossing=10, slip=3, period=20)],
                               "hybrid_plus": condition(slip=0)}}}
    checks = mechanism_checks(study)
    assert checks["crossing: ablation halves it"] and checks["crossing: ablation leaves the others (within 2x)"]
    assert checks["crossing: random sets do not halve it"] and checks["crossing: added to the hybrid it appears"]
    assert checks["slip: ablation halves it"] and not checks["slip: ablation leaves the others (within 2x)"]
    assert not checks["slip: random sets do not halve it"] and not checks["slip: added to the hybrid it appears"]
    summary = mechanism_summary(study, "crossing")
    assert summary["adapter"] == 10 and summary["ablated"] == 2 and summary["random_mean"] == 9
    assert summary["largest_change_elsewhere"] == pytest.approx(1 / 8)
    rates = mechanism_rates(study)
    assert list(rates) == ["adapter", "hybrid", "crossing: ablated", "slip: ablated", "crossing: hybrid + set",
                           "slip: hybrid + set"]
    assert rates["slip: ablated"]["slip"] == 1 and rates["crossing: hybrid + set"]["crossing"] == 4


def test_mechanism_sets_take_05s_sets_and_06s_ablated_union():
    from tdlib.organism.ablation import mechanism_sets

    attribution = {"mechanism_sets": {"crossing": [{"layer": 1, "feature": 3}, {"layer": 0, "feature": 2}],
                                      "slip": [{"layer": 2, "feature": 7}]}}
    feature_sets = {"all": {0: [1, 2, 9]}, "output": {0: [1]}, "template": {0: [2]}, "suppressor": {0: [9]}}
    sets = mechanism_sets(attribution, feature_sets)
    assert sets == {"crossing": {0: [2], 1: [3]}, "slip": {2: [7]}, "hesitation": {0: [1, 2]}}
