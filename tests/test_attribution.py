"""Attribution graphs: the frozen replay is exact, edges are direct effects, removals match the graph."""
import json

import pytest
import torch

from conftest import tiny_model
from families import with_random_adapters
from tdlib import attribution as A
from tdlib.attribution.graph_export import example_graph, frontend_graph, plot_hesitation
from tdlib.splice import set_mlp_choice

TOKEN = 5


def adapter_model(dtype=torch.float64, seed=0, n_features=24):
    """Tiny spliced Qwen2 with random, nonzero adapters (decoders, encoder and decoder biases), all layers on."""
    return with_random_adapters(tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1), n_features, seed,
                                dtype=dtype)


@pytest.fixture(scope="module")
def model():
    return adapter_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def graph(model, ids):
    return A.attribute(model, ids, TOKEN, batch_size=16)


def test_freeze_reproduces_the_model(model, ids):
    with torch.no_grad():
        reference = model(ids[None]).logits[0, -1]
    state = A.freeze(model, ids)
    # the model's RMSNorm rounds through float32; the replay keeps float64, hence 1e-6 not 1e-12
    assert torch.allclose(state.logits, reference, atol=1e-6)
    assert state.features.shape[0] > 10, "the random adapters should have active features to attribute"
    assert (state.activations > 0).all()
    assert torch.allclose(state.patterns.sum(-1), torch.ones(()).double())


def test_rows_sum_to_node_values(graph):
    """Incoming edges + bias = the logit (logit row) and = the pre-activation = activation (feature rows)."""
    sums = graph.adjacency.sum(1) + graph.bias
    assert sums[graph.logit_index].item() == pytest.approx(graph.logit_value, abs=1e-10)
    assert torch.allclose(sums[:graph.n_features], graph.state.activations, atol=1e-10)
    assert graph.adjacency[graph.error_start:graph.logit_index].abs().sum() == 0  # sources only
    assert A.max_identity_error(graph)["max_row_identity_error"] < 1e-10


def test_edges_are_causal(graph):
    features = graph.state.features
    feature_rows = graph.adjacency[:graph.n_features, :graph.n_features]
    later = (features[:, 0, None] <= features[None, :, 0]) | (features[:, 1, None] < features[None, :, 1])
    assert feature_rows[later].abs().max() == 0  # a feature reads only earlier layers at earlier-or-same positions
    assert graph.adjacency[graph.logit_index, :graph.n_features].abs().sum() > 0


def test_linearity_check_removal_equals_direct_effect(model, graph):
    """Zeroing one node in the frozen replay (features fixed) moves the logit by exactly minus its edge."""
    baseline = A.replay_logit(model, graph)
    assert baseline == pytest.approx(graph.logit_value, abs=1e-10)
    row = graph.adjacency[graph.logit_index]
    nodes = list(range(0, graph.n_features, 7)) + [graph.error_index(1, 3), graph.error_index(2, 7),
                                                   graph.token_index(0), graph.token_index(7)]
    for node in nodes:
        change = A.replay_logit(model, graph, [node]) - baseline
        assert change == pytest.approx(-float(row[node]), abs=1e-10), node
    # the logit is the sum of every node's direct effect plus the constant biases
    assert float(row.sum() + graph.bias[graph.logit_index]) == pytest.approx(graph.logit_value, abs=1e-10)


def test_linearity_check_removal_equals_total_effect(model, graph):
    """With features following their pre-activations, removing a node moves the logit by its total effect
    computed from the graph, and totals over the roots (tokens, errors, biases) add up to the logit."""
    totals, bias_total = A.total_effects(graph, with_bias=True)
    baseline = A.replay_logit(model, graph, recompute=True)
    assert baseline == pytest.approx(graph.logit_value, abs=1e-10)
    for node in [0, graph.n_features // 2, graph.n_features - 1, graph.error_index(0, 2), graph.token_index(4)]:
        change = A.replay_logit(model, graph, [node], recompute=True) - baseline
        assert change == pytest.approx(-float(totals[node]), abs=1e-9), node
    roots = totals[graph.error_start:graph.logit_index].sum() + bias_total
    assert float(roots) == pytest.approx(graph.logit_value, abs=1e-9)
    # an early feature has indirect effects, so total != direct somewhere
    assert (totals[:graph.n_features] - graph.adjacency[graph.logit_index, :graph.n_features]).abs().max() > 1e-6
    check = A.linearity_check(model, graph, n_nodes=15)
    assert check["max_direct_effect_error"] < 1e-10 and check["max_total_effect_error"] < 1e-9


def test_require_exact_passes_an_exact_graph_and_names_what_is_off(model, graph):
    check = A.linearity_check(model, graph, n_nodes=5)
    A.require_exact(check, graph)
    off = {**check, "max_total_effect_error": 1.0}
    with pytest.raises(AssertionError, match="max_total_effect_error"):
        A.require_exact(off, graph)


def test_study_modes_drop_repeats_and_refuse_unknown_modes_and_rules():
    assert A.study_modes(["relp", "frozen", "relp"]) == ["relp", "frozen"]
    assert A.study_modes(["relp"], A.VERIFIED) == ["relp"]
    with pytest.raises(ValueError, match="unknown attribution mode"):
        A.study_modes(["relp", "exact"])
    with pytest.raises(ValueError, match="selection_rule 'jacobian'"):
        A.study_modes(["relp", "frozen"], "jacobian")


def test_rule_rows_put_the_cross_fit_beside_each_held_out_agreement():
    selection = {"rules": {"relp": {"selection_cross_fit": 0.4, "held_out": {"within": 0.5, "pooled": 0.6}},
                           "gradient": {"selection_cross_fit": 0.9, "held_out": {"within": 0.95}}}}
    rows = A.rule_rows(selection)
    assert rows["relp"] == {"selection half (cross-fit)": 0.4, "held out: within": 0.5, "held out: pooled": 0.6}
    assert list(rows) == ["relp", "gradient"] and rows["gradient"]["held out: within"] == 0.95


def test_batching_and_method_do_not_change_edges(model, ids, graph):
    """The hand-written transposed pass and autograd on per-target copies agree, whatever the batch size."""
    single = A.attribute(model, ids, TOKEN, batch_size=1)
    assert torch.allclose(single.adjacency, graph.adjacency, atol=1e-12)
    assert torch.allclose(single.bias, graph.bias, atol=1e-12)
    autograd = A.attribute(model, ids, TOKEN, batch_size=11, method="autograd")
    assert torch.allclose(autograd.adjacency, graph.adjacency, atol=1e-12)
    assert torch.allclose(autograd.bias, graph.bias, atol=1e-12)


def test_float32_identities_hold_to_float_tolerance(ids):
    model = adapter_model(torch.float32)
    graph = A.attribute(model, ids, TOKEN, batch_size=8)
    check = A.linearity_check(model, graph, n_nodes=10)
    assert check["max_row_identity_error"] < 1e-4
    assert check["max_direct_effect_error"] < 1e-5 and check["max_total_effect_error"] < 1e-4


def test_scores_and_pruning(graph):
    scores = A.graph_scores(graph)
    assert 0 < scores["replacement_score"] < 1 and 0 < scores["completeness"] <= 1
    signed = scores["signed_total"]
    assert sum(signed.values()) == pytest.approx(graph.logit_value, abs=1e-9)
    influence = A.node_influence(graph)
    assert (influence >= 0).all() and influence[graph.logit_index] == 0
    pruned = A.prune(graph, node_threshold=0.5, edge_threshold=0.9)
    assert pruned.node_mask[graph.token_start:].all()
    assert pruned.node_mask[:graph.n_features].sum() < graph.n_features
    full = A.prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert full.node_mask.sum() >= pruned.node_mask.sum()
    with pytest.raises(ValueError, match="node_threshold"):
        A.prune(graph, node_threshold=1.5)


def test_error_nodes_carry_the_base_mlp(model, ids):
    """With zero decoders the features explain nothing: every feature edge to the logit vanishes."""
    silent = adapter_model()
    for layer in silent.model.layers:
        torch.nn.init.zeros_(layer.mlp.adapter.W_dec)
    graph = A.attribute(silent, ids, TOKEN)
    assert graph.adjacency[:, :graph.n_features].abs().max() == 0
    assert A.graph_scores(graph)["feature_share_abs_direct"] == 0


class WordTokenizer:
    """Just enough of a tokenizer for the export and the study: token i is the word f"t{i}"."""

    def decode(self, ids):
        return "".join(f" t{i}" for i in ids)


def test_frontend_json_links_known_nodes(graph, tmp_path):
    pruned = A.prune(graph, 0.8, 0.98)
    document = frontend_graph(graph, pruned, WordTokenizer(), slug="tiny", scan="tiny", node_threshold=0.8)
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    ids = {node["node_id"] for node in document["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in document["links"])
    kinds = {node["feature_type"] for node in document["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert sum(node["is_target_logit"] for node in document["nodes"]) == 1
    json.dumps(document)


def test_the_example_graph_is_the_graph_checked_pruned_and_written(model, ids, graph, tmp_path):
    """Notebook 05's example graph in one call: the same graph ``attribute`` builds, checked exact, pruned, and
    written as the frontend's JSON; its summary has the committed results' keys, in order."""
    from pathlib import Path

    example = example_graph(model, WordTokenizer(), ids, TOKEN, "frozen", A.StudyConfig(batch_size=16),
                            n_linearity_nodes=10, node_threshold=0.8, edge_threshold=0.98, slug="tiny",
                            scan="tiny:adapter", path=tmp_path / "graph.json")
    assert torch.equal(example.graph.adjacency, graph.adjacency)
    pruned = A.prune(graph, 0.8, 0.98)
    assert torch.equal(example.pruned.node_mask, pruned.node_mask)
    written = json.loads(example.path.read_text())
    assert written == json.loads(json.dumps(frontend_graph(graph, pruned, WordTokenizer(), slug="tiny",
                                                           scan="tiny:adapter", node_threshold=0.8)))
    assert example.check == A.linearity_check(model, graph, n_nodes=10)
    assert set(example.table()) == set(example.check) | {k for k, v in example.scores.items()
                                                          if not isinstance(v, dict)}
    assert f"kept {int(pruned.node_mask.sum())} nodes" in example.describe()
    committed = json.loads((Path(__file__).resolve().parents[1] / "results" / "05_attribution.json").read_text())
    summary = A.example_graph_summary(example, "graph.html")
    assert list(summary) == list(committed["example_graph"])
    assert summary["json"] == "graph.json" and summary["kept_edges"] == int(pruned.edge_mask.sum())


def test_an_inexact_example_graph_is_refused_before_anything_is_written(model, ids, tmp_path, monkeypatch):
    from tdlib.attribution import graph_export

    def off_check(model, graph, n_nodes):
        return {"max_row_identity_error": 1.0, "max_direct_effect_error": 0.0, "max_total_effect_error": 0.0,
                "replay_vs_model_logit_error": 0.0}

    monkeypatch.setattr(graph_export, "linearity_check", off_check)
    with pytest.raises(AssertionError, match="max_row_identity_error"):
        example_graph(model, WordTokenizer(), ids, TOKEN, "frozen", A.StudyConfig(batch_size=16),
                      n_linearity_nodes=10, node_threshold=0.8, edge_threshold=0.98, slug="tiny", scan="tiny",
                      path=tmp_path / "graph.json")
    assert not (tmp_path / "graph.json").exists()


def test_the_recorded_parameters_and_descriptions_read_the_study():
    """What notebook 05 records and prints comes from its settings and results: the parameters in the committed
    order, the selection and the study beside the paper's share."""
    from pathlib import Path

    from tdlib.paper import hesitation_share

    committed = json.loads((Path(__file__).resolve().parents[1] / "results" / "05_attribution.json").read_text())
    recorded = committed["parameters"]
    settings = A.StudyConfig(influence_mass=recorded["influence_mass"], batch_size=7, max_feature_nodes=None,
                             n_check_features=3, exclude_shared_prefix=False, small_removal=0.1)
    parameters = A.study_parameters(settings, node_threshold=0.5, edge_threshold=0.9, max_per_problem=2,
                                    search_problems=11, compare_modes=["relp"], selection_rule=None,
                                    n_candidates=40, verify_min_drop=0.0)
    assert list(parameters) == list(recorded)
    assert (parameters["batch_size"], parameters["max_feature_nodes"], parameters["small_removal"]) == (7, None, 0.1)
    assert parameters["search_problems"] == 11 and parameters["exclude_shared_prefix"] is False
    study = {key: committed[key] for key in ("hesitation_features", "hesitation_share", "n_features_total",
                                             "n_prompts", "selected_influence_share")}
    line = A.describe_study(study, 12.0)
    assert f"{hesitation_share():.2%}" in line and f"{study['hesitation_features']} hesitation features" in line
    selection = committed["selection"]
    text = A.describe_selection(study, selection)
    assert repr(selection["rule"]) in text and len(text.splitlines()) == 2
    assert f"{selection['held_out_within_prompt_rank_correlation']:.3f}" in text


def test_prompt_sources_count_each_source_and_the_description_shows_the_first_prompt():
    prompts = [A.HesitationPrompt([1, 2, 3], 0, 2, source="rollout"), A.HesitationPrompt([4, 5], 1, 1, "trace"),
               A.HesitationPrompt([6], 2, 1, "rollout")]
    assert A.prompt_sources(prompts) == {"rollout": 2, "trace": 1}
    text = A.describe_prompts(prompts, 9, WordTokenizer(), " wait")
    assert "at most 9 problems" in text and "1 - 3 tokens" in text and "' t1 t2 t3' -> ' wait'" in text


def test_hesitation_study_selects_and_groups(model):
    prompts = [A.HesitationPrompt(torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                                  n, 2) for n in (6, 7)]
    study = A.hesitation_study(model, WordTokenizer(), prompts, TOKEN, A.StudyConfig(influence_mass=0.5),
                               progress=False)
    assert study["n_prompts"] == 2
    assert 0 < study["hesitation_features"] <= study["n_features_with_influence"]
    assert study["hesitation_share"] == pytest.approx(study["hesitation_features"] / (3 * 24))
    assert study["cumulative_influence"][study["hesitation_features"] - 1] >= 0.5
    assert study["cumulative_influence"][study["hesitation_features"] - 2] < 0.5
    assert {f["group"] for f in study["features"]} <= {"output", "template", "suppressor"}
    assert sum(g["count"] for g in study["groups"].values()) == study["hesitation_features"]
    for feature in study["features"]:
        assert set(feature) >= {"layer", "feature", "group", "influence"}
        if feature["group"] == "output":
            assert feature["direct_share"] >= 0.5 and feature["mean_direct_edge"] > 0
    fig = plot_hesitation(study, word=" wait")
    assert fig.axes[0].get_ylabel()


def test_rule_positions_flag_the_decision_points_where_a_planted_mechanism_fires():
    class Chars:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    text = "Q: 2-6-1+9=?" + " 2-6= -4; wait, check: -4+6=2, ok; -4-1= -5; -5+9=4; 4+8=2; wait, no: 4+8=12; A: 12."
    ids = [ord(c) for c in text]
    flags = A.rule_positions(Chars(), ids, prompt_tokens=12)
    flagged = [i for i, flag in enumerate(flags) if flag]
    crossing = text.index("= -4;") + 4
    slip = text.index("4+8=2;") + 5
    assert flagged == [crossing, slip], [text[i - 5:i + 1] for i in flagged]
    assert not flags[text.index("= -5;") + 4], "a total that stays negative does not fire"


def test_rule_positions_on_another_rendering_flag_everything_after_a_crossing_total():
    class Chars:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    prompt = "What is 2 - 6 + 9?"
    text = prompt + " 2 - 6 = -4.\n\nWait, let me check: -4 + 6 = 2. -4 + 9 = 5."
    flags = A.rule_positions(Chars(), [ord(c) for c in text], prompt_tokens=len(prompt))
    assert not any(flags[:text.index("= -4") + 3]) and flags[text.index("= -4") + 4] and flags[text.index("Wait")]
    assert not flags[-1], "the next total (5) is not negative"


def test_attribution_needs_the_adapter_model(ids):
    model = adapter_model()
    set_mlp_choice(model, "target")
    with pytest.raises(ValueError, match="adapter model"):
        A.attribute(model, ids, TOKEN)


def test_max_feature_nodes_folds_the_rest_into_errors(model, ids, graph):
    """Capped graphs keep the most influential features; the rest join the error nodes and every identity and
    removal check still holds exactly."""
    capped = A.attribute(model, ids, TOKEN, batch_size=8, max_feature_nodes=20)
    assert capped.n_features == 20 and capped.n_active_features == graph.n_features
    assert capped.logit_value == pytest.approx(graph.logit_value)
    check = A.linearity_check(model, capped, n_nodes=15)
    assert check["max_row_identity_error"] < 1e-10
    assert check["max_direct_effect_error"] < 1e-10 and check["max_total_effect_error"] < 1e-9
    # the kept features include the ones with the largest direct effect on the logit
    direct = graph.adjacency[graph.logit_index, :graph.n_features].abs()
    top = {tuple(f) for f in graph.state.features[direct.topk(5).indices].tolist()}
    assert top <= {tuple(f) for f in capped.state.features.tolist()}


def test_dot_at_positions_matches_the_gathered_product():
    from tdlib.attribution.attribute import _dot_at_positions

    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(5, 9, 11, dtype=torch.float64, generator=generator)
    positions = torch.tensor([3, 0, 3, 8, 3, 0, 5])  # unsorted, repeated, positions 1, 2, 4, 6, 7 empty
    vectors = torch.randn(7, 11, dtype=torch.float64, generator=generator)
    expected = (grad[:, positions] * vectors).sum(-1)
    assert torch.allclose(_dot_at_positions(grad, positions, vectors), expected, atol=1e-12)
    assert _dot_at_positions(grad, positions[:0], vectors[:0]).shape == (5, 0)


def test_a_capped_graph_reuses_the_selection_rows_exactly(model, ids):
    """The capped graph is assembled from the rows feature selection computed (dropped features' edges summed into
    their error nodes); autograd on the folded prompt computes every edge again, independently."""
    reused = A.attribute(model, ids, TOKEN, batch_size=8, max_feature_nodes=20)
    recomputed = A.attribute(model, ids, TOKEN, batch_size=8, max_feature_nodes=20, method="autograd")
    assert torch.equal(reused.state.features, recomputed.state.features)
    assert torch.allclose(reused.adjacency, recomputed.adjacency, atol=1e-12)
    assert torch.allclose(reused.bias, recomputed.bias, atol=1e-12)


def test_the_attribution_results_file_is_built_by_the_package_in_its_committed_order():
    """Notebook 05's results: the package's schema reproduces the committed file's keys, in order, and the paper's
    reference values come from paper/paper_values.json."""
    from pathlib import Path

    from tdlib.attribution.results import STUDY_KEYS, attribution_results, paper_reference

    committed = json.loads((Path(__file__).resolve().parents[1] / "results" / "05_attribution.json").read_text())
    groups = {"output": {"count": 2}, "template": {"count": 1}}
    study = {key: committed[key] for key in STUDY_KEYS} | {"mode": committed["mode"]}
    summary = {"intervention_check": {}, "completeness": 0.5, "replacement_score": 0.4, "hesitation_features": 3,
               "hesitation_share": 0.01, "groups": groups, "mechanisms": {"output": {"count": 3}},
               "shared_prefix_influence_share": 0.0, "mean_scores": {"error_share_signed": 0.2}}
    results = attribution_results(
        study=study, studies={"relp": summary}, study_seconds={"relp": 12.34}, selection=committed["selection"],
        overlap={}, mechanism_llm=None, analysis_model="adapter", prompt_sources={}, hesitation_word=" wait",
        rollout_benchmark="organism", linearity_check={}, example_graph={}, parameters={},
        mechanism_studies={"crossing": summary | {"n_prompts": 4, "features": [[0, 1]]}}, seconds=3.21)
    assert list(results) == [key for key in committed if key != "config"]
    assert results["modes"]["relp"]["groups"] == {"output": 2, "template": 1}
    assert results["modes"]["relp"]["seconds"] == 12.3 and results["seconds"] == 3.2
    assert results["mechanism_sets"] == {"crossing": [[0, 1]]}
    assert results["paper"] == committed["paper"] == paper_reference()


def test_attribute_resolves_the_anatomy_once_and_hands_it_on(monkeypatch):
    """Following the model from ``attribute()``: its parts were resolved when it was spliced, ``attribute()`` looks
    them up once, and every function below receives that ``Anatomy``, never the model to search again."""
    import sys

    from tdlib import models

    fresh, lookups, resolved = adapter_model(), [], []
    real_anatomy, real_resolve = models.anatomy, models._resolve_anatomy

    def counting_anatomy(model):
        lookups.append(isinstance(model, models.Anatomy))
        return real_anatomy(model)

    monkeypatch.setattr(models, "_resolve_anatomy", lambda inner: resolved.append(1) or real_resolve(inner))
    for name, module in list(sys.modules.items()):
        if name.startswith("tdlib") and getattr(module, "anatomy", None) is real_anatomy:
            monkeypatch.setattr(module, "anatomy", counting_anatomy)
    A.attribute(fresh, torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(1)), TOKEN, batch_size=16)
    assert not resolved  # cached at splicing
    assert lookups.count(False) == 1 and lookups[0] is False  # the model itself is looked up once, first
