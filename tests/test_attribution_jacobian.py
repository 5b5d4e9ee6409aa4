"""Mode "jacobian": the base MLPs passed through by their true derivative. On every family its edges into the logit
equal autograd through the real base-MLP modules (attention patterns and norms frozen), in float64; the paper's
rules (mode "relp") do not, which is what the intervention check measures on real pairs."""
import pytest
import torch

from families import REPLAYABLE, family_model, with_random_adapters
from tdlib import attribution as A
from tdlib.attribution.replay import LinearisedMLP

TOKEN = 5
IDS = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(3))
CASES = [(f, None) for f in REPLAYABLE if f not in ("gemma2", "gemma3")] + [
    (f, p) for f in ("gemma2", "gemma3") for p in ("mlp_output", "residual")]


def adapter_model(family: str, placement: str | None = None):
    meta = {} if placement is None else {"placement": placement}
    return with_random_adapters(family_model(family, seed=0), family_model(family, seed=1), meta=meta,
                                dtype=torch.float64)


@pytest.mark.parametrize("family, placement", CASES)
def test_jacobian_edges_are_the_models_derivative(family, placement):
    model = adapter_model(family, placement)
    graph = A.attribute(model, IDS, TOKEN, batch_size=16, mode="jacobian")
    check = A.derivative_check(model, graph)
    assert check["row_scale"] > 1e-3
    assert check["max_abs_gap"] < 1e-10 * max(1.0, check["row_scale"])
    # the first-order decomposition is not exact: its remainder sits in error nodes, and the identities still hold
    assert graph.state.errors.abs().max() > 1e-4
    scores = A.graph_scores(graph)
    assert sum(scores["signed_total"].values()) == pytest.approx(graph.logit_value, abs=1e-8)
    assert scores["signed_total"]["errors"] != 0


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_the_papers_rules_are_not_the_derivative(family):
    """The half rule and the frozen sigmoid give edges of the wrong size (and sometimes sign) through base MLPs."""
    model = adapter_model(family)
    graph = A.attribute(model, IDS, TOKEN, batch_size=16, mode="relp")
    check = A.derivative_check(model, graph)
    assert check["max_abs_gap"] > 1e-4 * check["row_scale"]  # tiny random MLPs: a small but real gap


def test_derivative_check_refuses_a_frozen_graph():
    model = adapter_model("qwen2")
    graph = A.attribute(model, IDS, TOKEN, mode="frozen")
    with pytest.raises(ValueError, match="passes no influence"):
        A.derivative_check(model, graph)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_jacobian_rule_is_the_mlps_jacobian(family):
    """Per position, the linear map equals torch.func's Jacobian of the MLP module; plus the remainder, its output."""
    model = adapter_model(family)
    mlp = model.model.layers[1].mlp.base_mlp
    x = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    linear = LinearisedMLP(mlp, x, "layer 1", 1e-9, rule="jacobian")
    direction = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for p in range(5):
        jacobian = torch.func.jacrev(mlp)(x[p:p + 1])[0, :, 0, :]  # [d_out, d_in]
        expected = jacobian @ direction[p]
        got = linearised_row(linear, direction, p)
        assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(linear.apply(x) + linear.constant, mlp(x), atol=1e-12)
    assert linear.constant.abs().max() > 1e-3  # a gated MLP is not linear


def linearised_row(linear: LinearisedMLP, direction: torch.Tensor, position: int) -> torch.Tensor:
    return linear.apply(direction)[position]


def test_unknown_rule_is_refused():
    model = adapter_model("qwen2")
    with pytest.raises(ValueError, match="linearisation rule"):
        LinearisedMLP(model.model.layers[0].mlp.base_mlp, torch.zeros(2, 32, dtype=torch.float64), "l0", 1e-9,
                      rule="half")


@pytest.mark.parametrize("mode", A.MODES)
def test_every_mode_prunes_exports_and_has_a_page(mode, tmp_path):
    """Pruning, influence, the circuit-tracer export and the graph page take a graph of any mode."""
    from tdlib.attribution.graph_export import frontend_graph
    from tdlib.attribution.graph_page import ERROR_MEANING, graph_page_data, write_graph_page

    class Words:
        def decode(self, ids):
            return "".join(f" t{i}" for i in ids)

    model = adapter_model("llama")
    graph = A.attribute(model, IDS, TOKEN, mode=mode)
    pruned = A.prune(graph, 0.8, 0.98)
    assert 0 < int(pruned.node_mask.sum()) <= graph.n_nodes
    assert A.node_influence(graph)[:graph.n_features].sum() > 0
    document = frontend_graph(graph, pruned, Words(), slug=mode, scan="tiny", node_threshold=0.8)
    assert document["nodes"] and document["links"]
    data = graph_page_data(graph, Words(), max_nodes=30, max_edges=100)
    assert data["mode"] == mode and data["error_meaning"] == ERROR_MEANING[mode]
    assert write_graph_page(data, tmp_path / "graph.html", mode).exists()


def test_the_diagnosis_script_with_norms_and_attention_frozen_is_the_jacobian_graph():
    """scripts/diagnose_frozen_parts.py's "both frozen" gradient x activation (through the model's own modules) equals
    the jacobian graph's predicted removals (minus total effects): the graph is what the script says it is."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from diagnose_frozen_parts import gradient_predictions

    model = adapter_model("llama")
    model.set_attn_implementation("eager")
    graph = A.attribute(model, IDS, TOKEN, mode="jacobian")
    predicted = gradient_predictions(model, IDS.tolist(), TOKEN, freeze_norms=True, freeze_attention=True)
    totals = graph.total_effects()
    for node, (layer, pos, feature) in enumerate(graph.state.features.tolist()):
        assert predicted[(layer, pos, feature)] == pytest.approx(-float(totals[node]), abs=1e-6)
    unfrozen = gradient_predictions(model, IDS.tolist(), TOKEN, freeze_norms=False, freeze_attention=False)
    assert any(abs(unfrozen[k] - predicted[k]) > 1e-4 for k in predicted)
