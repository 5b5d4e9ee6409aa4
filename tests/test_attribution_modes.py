"""The base-MLP modes of attribution (frozen, relp, target, jacobian): exact on every family, equal to the paper's rules
applied to the real model's own modules by autograd, and checked against removals in the real model."""
import contextlib

import pytest
import torch

from families import REPLAYABLE, family_model, with_random_adapters
from tdlib import attribution as A
from tdlib.attribution.capture import NotReplayable
from tdlib.attribution.replay import LinearisedMLP, check_mode
from tdlib.splice import mlp_choice

TOKEN = 5
IDS = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(3))  # longer than the sliding window
CASES = [(f, None) for f in REPLAYABLE if f not in ("gemma2", "gemma3")] + [
    (f, p) for f in ("gemma2", "gemma3") for p in ("mlp_output", "residual")]


def adapter_model(family: str, placement: str | None = None, dtype=torch.float64, decoder_scale: float = 1.0):
    meta = {} if placement is None else {"placement": placement}
    model = with_random_adapters(family_model(family, seed=0), family_model(family, seed=1), meta=meta, dtype=dtype)
    if decoder_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.adapter.W_dec.mul_(decoder_scale)
    return model


@pytest.mark.parametrize("family, placement", CASES)
@pytest.mark.parametrize("mode", A.MODES)
def test_every_mode_is_exact_on_every_family(family, placement, mode):
    """The replay reproduces the model it describes (the adapter model; the target in mode "target"), rows sum to
    node values, removals in the replay match edges and total effects, and autograd agrees with the transpose."""
    model = adapter_model(family, placement)
    with torch.no_grad(), mlp_choice(model, "target" if mode == "target" else "adapter"):
        reference = model(IDS[None]).logits[0, -1]
    graph = A.attribute(model, IDS, TOKEN, batch_size=16, mode=mode)
    assert graph.state.mode == mode and graph.n_features > 10
    assert torch.allclose(graph.state.model_logits(), reference, atol=1e-5, rtol=1e-5)
    check = A.linearity_check(model, graph, n_nodes=15)
    assert check["max_row_identity_error"] < 1e-9
    assert check["max_direct_effect_error"] < 1e-9 and check["max_total_effect_error"] < 1e-9
    assert check["replay_vs_model_logit_error"] < 1e-9
    autograd = A.attribute(model, IDS, TOKEN, batch_size=7, method="autograd", mode=mode)
    assert torch.allclose(autograd.adjacency, graph.adjacency, atol=1e-10)
    assert torch.allclose(autograd.bias, graph.bias, atol=1e-10)
    signed = A.graph_scores(graph)["signed_total"]
    assert sum(signed.values()) == pytest.approx(graph.logit_value, abs=1e-8)
    if mode == "relp":  # bias-free gated MLPs pass through exactly: nothing is left for an error node
        assert graph.state.errors.abs().max() == 0
        assert A.graph_scores(graph)["completeness"] == pytest.approx(1.0)
    if mode == "target":  # what the adapter misses of the target's MLPs
        assert graph.state.errors.abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_the_linearised_base_mlp_is_exact_at_the_prompt(family):
    model = adapter_model(family)
    mlp = model.model.layers[1].mlp.base_mlp
    x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    linear = LinearisedMLP(mlp, x, "layer 1", 1e-9)
    assert torch.allclose(linear.apply(x), mlp(x), atol=1e-12)
    assert linear.constant.abs().max() < 1e-12  # bias-free
    # the linear map is linear: a scaled input scales the output (the real MLP would not)
    assert torch.allclose(linear.apply(2 * x), 2 * linear.apply(x), atol=1e-12)
    assert not torch.allclose(mlp(2 * x), 2 * mlp(x), atol=1e-3)


def test_a_biased_mlp_keeps_its_biases_as_a_constant():
    model = adapter_model("llama")
    mlp = model.model.layers[0].mlp.base_mlp
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.bias = torch.nn.Parameter(0.1 * torch.randn(proj.out_features, dtype=torch.float64))
    x = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    linear = LinearisedMLP(mlp, x, "layer 0", 1e-9)
    assert torch.allclose(linear.apply(x) + linear.constant, mlp(x), atol=1e-12)
    assert linear.constant.abs().max() > 1e-3
    graph = A.attribute(model, IDS, TOKEN, mode="relp")
    assert A.linearity_check(model, graph, n_nodes=10)["max_row_identity_error"] < 1e-9


def test_a_non_gated_mlp_is_refused_in_the_modes_that_pass_through_it():
    model = adapter_model("qwen2")
    model.model.layers[2].mlp.base_mlp.gate_proj = None
    with pytest.raises(NotReplayable, match="layer 2's base MLP.*gated MLP"):
        A.attribute(model, IDS, TOKEN, mode="relp")
    with pytest.raises(ValueError, match="unknown attribution mode"):
        check_mode("linear")


# ------------------------------------------------------------------------- the paper's rules, by autograd
@contextlib.contextmanager
def relp_rules(model, mode: str, monkeypatch):
    """The real model's own modules under the paper's rules (RMSNorm denominators and attention patterns
    detached, SiLU's sigmoid detached, the half rule on gate * up, adapter features detached: they are nodes),
    or with each base MLP's output detached ("frozen"), or left as it is ("jacobian"), or the target's MLP written as base MLP + features +
    detached error ("target"). Yields a dict that collects each layer's feature activations (leaves)."""
    features: dict[int, torch.Tensor] = {}
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda *a, **k: softmax(*a, **k).detach())
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    for norm in norms:
        monkeypatch.setattr(norm, "forward", lambda x, n=norm: n.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.variance_epsilon).detach()))

    def linear_base(base, x):
        gate, up = base.gate_proj(x), base.up_proj(x)
        act = gate * torch.sigmoid(gate).detach()
        return base.down_proj(0.5 * act * up.detach() + 0.5 * act.detach() * up)

    for layer, block in enumerate(model.model.layers):
        spliced = block.mlp
        base, adapter = spliced.base_mlp, spliced.adapter
        if mode == "target":
            def target_forward(x, layer=layer, spliced=spliced, base=base, adapter=adapter):
                acts = adapter.encode(x).detach().requires_grad_(True)
                features[layer] = acts
                writes = acts @ adapter.W_dec.T + adapter.b_dec
                error = (spliced.target_mlp(x) - base(x) - adapter(x).out).detach()
                return linear_base(base, x) + writes + error
            monkeypatch.setattr(spliced, "forward", target_forward)
            continue
        if mode != "jacobian":  # jacobian: the base MLP as it is, so autograd takes its true derivative
            monkeypatch.setattr(base, "forward", (lambda x, b=base: b.__class__.forward(b, x).detach())
                                if mode == "frozen" else (lambda x, b=base: linear_base(b, x)))

        def leaf(module, args, output, layer=layer):
            features[layer] = output.detach().requires_grad_(True)
            return features[layer]
        handle = adapter.features.register_forward_hook(leaf)
        monkeypatch.setattr(torch.nn.Module, "_tdlib_test_handles", getattr(torch.nn.Module, "_tdlib_test_handles",
                                                                              []) + [handle], raising=False)
    try:
        yield features
    finally:
        for handle in getattr(torch.nn.Module, "_tdlib_test_handles", []):
            handle.remove()


@pytest.mark.parametrize("mode", A.MODES)
def test_the_logit_row_equals_the_rules_applied_to_the_real_model(mode, monkeypatch):
    """circuit-tracer's kind of equivalence: the graph's edges into the logit (tokens and features) equal
    gradient x value through the real model's own modules with the paper's detach rules (an independent
    implementation: no replay code involved)."""
    model = adapter_model("qwen2")
    graph = A.attribute(model, IDS, TOKEN, mode=mode)
    model.set_attn_implementation("eager")
    with monkeypatch.context() as patch, relp_rules(model, mode, patch) as features, \
            mlp_choice(model, "target" if mode == "target" else "adapter"):
        embeddings = model.model.embed_tokens(IDS[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeddings).logits[0, -1]
        (logits[TOKEN] - logits.mean()).backward()
    row = graph.adjacency[graph.logit_index]
    tokens = (embeddings.grad * embeddings)[0].sum(-1)
    assert torch.allclose(row[graph.token_start:graph.logit_index], tokens, atol=1e-6)
    for node, (layer, pos, feature) in enumerate(graph.state.features.tolist()):
        edge = features[layer].grad[0, pos, feature] * features[layer][0, pos, feature]
        assert float(row[node]) == pytest.approx(float(edge.detach()), abs=1e-6), (layer, pos, feature)
    assert row[:graph.n_features].abs().sum() > 0


# ------------------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("family, placement", [("qwen2", None), ("gemma3", "residual"), ("gemma3", "mlp_output")])
@pytest.mark.parametrize("mode", A.MODES)
def test_removing_a_last_layer_feature_in_the_real_model(family, placement, mode):
    """A last-layer feature at the last position reaches that position's logit only directly, so its removal
    equals an independent edit of the whole model: its decoder column zeroed (adapter model), or its write
    subtracted at every position of the last layer (target), at the adapter's placement."""
    model = adapter_model(family, placement)
    graph = A.attribute(model, IDS, TOKEN, mode=mode)
    last_layer = graph.n_layers - 1
    nodes = [i for i, (l, p, _) in enumerate(graph.state.features.tolist())
             if l == last_layer and p == graph.n_pos - 1][:4]
    assert nodes
    actual = A.removal_effects(model, graph, nodes, batch_size=3)
    block = model.model.layers[last_layer]
    adapter = block.mlp.adapter

    def demeaned():
        with torch.no_grad():
            logits = model(IDS[None]).logits[0, -1]
        return float(logits[TOKEN] - logits.mean())

    with mlp_choice(model, "target" if mode == "target" else "adapter"):
        baseline = demeaned()
        for node, change in zip(nodes, actual):
            feature = int(graph.state.features[node, 2])
            if mode != "target":
                saved = adapter.W_dec[:, feature].clone()
                with torch.no_grad():
                    adapter.W_dec[:, feature] = 0
                try:
                    expected = demeaned() - baseline
                finally:
                    with torch.no_grad():
                        adapter.W_dec[:, feature] = saved
            else:
                inputs = {}
                pre = block.mlp.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0]))
                where = block.post_feedforward_layernorm if placement == "residual" else block.mlp
                post = where.register_forward_hook(lambda m, args, out: out - torch.relu(
                    inputs["x"] @ adapter.W_enc[feature] + adapter.b_enc[feature])[..., None] * adapter.W_dec[:, feature])
                try:
                    expected = demeaned() - baseline
                finally:
                    pre.remove()
                    post.remove()
            assert change == pytest.approx(expected, abs=1e-9, rel=1e-4)  # norms round through float32
    records = A.intervention_records(model, graph, n_features=10)
    assert len(records) == 10 and {"predicted_total", "predicted_direct", "actual"} <= set(records[0])


def test_removal_effects_leave_the_model_as_it_was():
    model = adapter_model("qwen2")
    graph = A.attribute(model, IDS, TOKEN, mode="relp")
    with torch.no_grad():
        before = model(IDS[None]).logits
    A.removal_effects(model, graph, [0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(IDS[None]).logits, before)
    with pytest.raises(ValueError, match="feature nodes"):
        A.removal_effects(model, graph, [graph.logit_index])


def test_rank_correlation_and_agreement():
    assert A.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert A.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert A.rank_correlation([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share a rank
    assert A.rank_correlation([1, 2], [1, 2]) != A.rank_correlation([1, 2], [1, 2])  # NaN below 3 points
    records = [{"predicted_total": p, "actual": a, "predicted_direct": 0.0}
               for p, a in ((1.0, 1.1), (-2.0, -1.0), (0.5, 0.5), (3.0, -3.0))]
    summary = A.agreement(records)
    assert summary["n"] == 4 and summary["sign_agreement"] == 0.75
    assert summary["median_relative_error"] == pytest.approx((0.0909 + 1.0) / 2, abs=1e-3)


# ------------------------------------------------------------------------------------------ the study
class WordTokenizer:
    def decode(self, ids):
        return "".join(f" t{i}" for i in ids)


def test_the_study_in_each_mode_excludes_the_shared_prefix_and_labels_mechanisms():
    model = adapter_model("qwen2")
    prefix = [7, 8, 9]
    prompts = [A.HesitationPrompt(prefix + torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n))
                                  .tolist(), n, 5) for n in (6, 7, 8)]
    assert A.shared_prefix_length(prompts) == 3
    studies = {}
    for mode in A.MODES:
        study = A.hesitation_study(model, WordTokenizer(), prompts, TOKEN,
                                   A.StudyConfig(mode=mode, influence_mass=0.6, n_check_features=5), progress=False)
        studies[mode] = study
        assert study["mode"] == mode and study["shared_prefix_tokens"] == 3
        assert 0 < study["shared_prefix_influence_share"] < 1
        assert {f["mechanism"] for f in study["features"]} <= set(A.FEATURE_ROLES)
        assert all(f["mechanism"] == "output" for f in study["features"] if f["group"] == "output")
        assert sum(g["count"] for g in study["mechanisms"].values()) == study["hesitation_features"]
        check = study["intervention_check"]
        assert check["total_effect"]["n"] == len(check["records"]) == 15
        assert all(r["position"] >= 3 for r in check["records"])
        assert all(len(study["contexts"][f"{f['layer']}/{f['feature']}"]) >= 1 for f in study["features"])
    assert studies["relp"]["completeness"] == pytest.approx(1.0)
    assert studies["frozen"]["completeness"] < 1.0
    overlap = A.set_overlap(studies["relp"]["features"], studies["frozen"]["features"])
    assert 0 <= overlap["jaccard"] <= 1 and overlap["size"] == studies["relp"]["hesitation_features"]
    assert A.set_overlap(studies["relp"]["features"], studies["relp"]["features"])["jaccard"] == 1.0


def test_single_prompt_keeps_only_the_attention_sink_out():
    prompts = [A.HesitationPrompt([1, 2, 3, 4], 0, 2)]
    assert A.shared_prefix_length(prompts) == 2  # at most the problem prompt
    prompts.append(A.HesitationPrompt([5, 2, 3], 1, 2))
    assert A.shared_prefix_length(prompts) == 1  # position 0 always


def test_the_mechanism_rule():
    config = A.StudyConfig()
    from tdlib.attribution.hesitation import FeatureEvidence, mechanism_label, token_profile

    entry = FeatureEvidence(tokens={4: 9.0, 5: 1.0}, token_fires={4: 9, 5: 1})
    share, reliability = token_profile(entry, {4: 10, 5: 50})
    assert share == pytest.approx(1.0) and reliability == pytest.approx(10 / 60)
    assert mechanism_label("template", share, reliability, config) == "input_abstract"
    entry = FeatureEvidence(tokens={4: 9.0}, token_fires={4: 9})
    assert mechanism_label("template", *token_profile(entry, {4: 10}), config) == "input_simple"
    assert mechanism_label("output", 0.0, 0.0, config) == "output"


# ------------------------------------------------------------------------------------------ the page
def test_the_graph_page_is_one_offline_file_with_every_kind_of_node(tmp_path):
    from tdlib.attribution.graph_page import graph_page_data, write_graph_page

    model = adapter_model("qwen2")
    graph = A.attribute(model, IDS, TOKEN, mode="target")
    first = graph.state.features[0].tolist()
    known = {f"{first[0]}/{first[2]}": {"group": "output", "mechanism": "output", "decoder_top_tokens": [" t5"],
                                        "contexts": [{"before": " t1", "token": " t2", "after": "", "activation": 1.0}]}}
    data = graph_page_data(graph, WordTokenizer(), known, max_nodes=40, max_edges=200,
                           decoder_tokens=lambda layer, feature: [" t9"])
    kinds = {n["kind"] for n in data["nodes"]}
    assert {"token", "logit", "error"} <= kinds and kinds & {"feature", "output"}
    assert len([n for n in data["nodes"] if n["kind"] not in ("token", "logit")]) <= 40
    assert 0 < len(data["edges"]) <= 200
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])
    assert data["mode"] == "target" and "adapter misses" in data["error_meaning"]
    page = write_graph_page(data, tmp_path / "graph.html", "tiny </script> graph")
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "https://" not in text  # nothing fetched
    assert "</script> graph" not in text  # the title is escaped
    assert f'data-nodes="{len(data["nodes"])}"' in text


def test_the_study_page_labels_the_selected_features_with_their_contexts(tmp_path):
    from tdlib.attribution.graph_page import write_study_page

    model = adapter_model("qwen2")
    graph = A.attribute(model, IDS, TOKEN, mode="relp")
    first = graph.state.features[0].tolist()
    context = {"before": "zzbefore", "token": "zztoken", "after": "", "activation": 1.0}
    study = {"features": [{"layer": first[0], "feature": first[2], "group": "output", "mechanism": "output"}],
             "contexts": {f"{first[0]}/{first[2]}": [context]}}
    page = write_study_page(graph, WordTokenizer(), study, tmp_path / "page.html", "study")
    assert "zzbefore" in page.read_text()  # the selected feature's context travels into the page
    study["contexts"] = {}
    assert "zzbefore" not in write_study_page(graph, WordTokenizer(), study, tmp_path / "bare.html", "s").read_text()


@pytest.mark.slow
def test_the_graph_page_draws_in_headless_chromium(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import check_feature_page
    from tdlib.attribution.graph_page import graph_page_data, write_graph_page

    try:
        check_feature_page.find_browser()
    except SystemExit as missing:
        pytest.skip(str(missing))
    model = adapter_model("gemma3", "residual")
    graph = A.attribute(model, IDS, TOKEN, mode="relp")
    page = write_graph_page(graph_page_data(graph, WordTokenizer()), tmp_path / "graph.html", "tiny")
    result = check_feature_page.check_graph_page(page, tmp_path / "graph.png")
    assert result["nodes"] > 3 and result["edges"] > 3


def test_the_llm_judge_labels_mechanisms(tmp_path):
    from test_llm_backend import MockAPI, backend_for

    api = MockAPI()
    original = api.answer
    api.answer = lambda body: ("input_abstract" if body["messages"][0]["content"].startswith("You label")
                               else original(body))
    try:
        model = adapter_model("qwen2")
        prompts = [A.HesitationPrompt(torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(n)).tolist(),
                                      n, 2) for n in (1, 2)]
        study = A.hesitation_study(model, WordTokenizer(), prompts, TOKEN,
                                   A.StudyConfig(mode="relp", influence_mass=0.5, n_check_features=0),
                                   progress=False)
        judged = A.judge_mechanisms(study, backend_for(api))
    finally:
        api.close()
    assert judged["counts"]["input_abstract"] == study["hesitation_features"] > 0
    assert all(f["mechanism_llm"] == "input_abstract" for f in study["features"])
    request = api.requests[0]["body"]["messages"][1]["content"]
    assert "decoder promotes" in request and "<<" in request  # promoted tokens and the marked context are shown
