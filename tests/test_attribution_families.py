"""The attribution replay on every architecture family: it reproduces the model, its graphs pass the linearity
check, and what it cannot replay is refused up front with the feature named."""
import pytest
import torch

from families import FAMILIES, REPLAYABLE, family_model, with_random_adapters
from tdlib import attribution as A
from tdlib.attribution.capture import NotReplayable
from tdlib.splice import get_placement

TOKEN = 5
IDS = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(3))  # longer than the sliding window


def adapter_model(family: str, placement: str | None = None, dtype=torch.float64):
    """Spliced tiny model with random, nonzero adapters on every layer, MLP choice "adapter"."""
    meta = {} if placement is None else {"placement": placement}
    return with_random_adapters(family_model(family, seed=0), family_model(family, seed=1), meta=meta, dtype=dtype)


@pytest.mark.parametrize("family", REPLAYABLE)
def test_replay_reproduces_the_model_and_passes_the_linearity_check(family):
    model = adapter_model(family)
    with torch.no_grad():
        reference = model(IDS[None]).logits[0, -1]
    graph = A.attribute(model, IDS, TOKEN, batch_size=16)
    assert graph.n_features > 10
    # the model's norms may compute in float32 (Gemma): the replay matches it to float32 precision
    assert torch.allclose(graph.state.model_logits(), reference, atol=1e-5, rtol=1e-5)
    check = A.linearity_check(model, graph, n_nodes=15)
    assert check["max_row_identity_error"] < 1e-9
    assert check["max_direct_effect_error"] < 1e-9 and check["max_total_effect_error"] < 1e-9
    assert check["replay_vs_model_logit_error"] < 1e-9  # the graph's logit is the replay's
    autograd = A.attribute(model, IDS, TOKEN, batch_size=7, method="autograd")
    assert torch.allclose(autograd.adjacency, graph.adjacency, atol=1e-10)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("placement", ["mlp_output", "residual"])
def test_both_adapter_placements_replay_exactly(family, placement):
    model = adapter_model(family, placement)
    assert get_placement(model) == placement
    graph = A.attribute(model, IDS, TOKEN, batch_size=16)
    check = A.linearity_check(model, graph, n_nodes=10)
    assert check["max_direct_effect_error"] < 1e-9 and check["max_total_effect_error"] < 1e-9


def test_the_replay_is_not_the_qwen2_formula_on_gemma():
    """Sliding windows are in the captured patterns: position 9 of a sliding layer ignores positions < 6."""
    model = adapter_model("gemma3")
    state = A.freeze(model, IDS)
    sliding, full = state.patterns[0], state.patterns[1]
    assert sliding[:, 9, :6].abs().max() == 0 and full[:, 9, :6].abs().max() > 0
    assert not torch.allclose(state.attn_weight[0], model.model.layers[0].input_layernorm.weight.double())


@pytest.mark.parametrize("family, feature", [("gpt2", "fused query/key/value"), ("neox", "fused query/key/value")])
def test_unreplayable_families_are_refused_before_any_work(family, feature):
    model = adapter_model(family)
    with pytest.raises(NotReplayable, match=feature):
        A.attribute(model, IDS, TOKEN)


def test_a_norm_that_is_not_a_scale_is_refused(monkeypatch):
    model = adapter_model("llama")
    norm = model.model.layers[1].post_attention_layernorm
    original = norm.forward
    monkeypatch.setattr(norm, "forward", lambda x: original(x) + 0.1 * x.pow(2))
    with pytest.raises(NotReplayable, match="layers.1.post_attention_layernorm|post_attention_layernorm"):
        A.freeze(model, IDS)


def test_every_family_is_covered():
    assert set(REPLAYABLE) < set(FAMILIES)
