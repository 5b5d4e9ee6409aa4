"""Adapter placement: where the adapter adds its output in blocks with a post-MLP norm (Gemma 2 / 3)."""
import pytest
import torch

from measure_placement import measure
from families import family_model
from tdlib.adapter import AdapterSet
from tdlib.splice import get_placement, mlp_choice, set_mlp_choice, set_placement, splice
from tdlib.steer import add_feature_directions

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def spliced(family, placement=None, b_dec=0.3):
    base, target = family_model(family, seed=0), family_model(family, seed=1)
    adapters = AdapterSet.for_model(target, 16, meta={} if placement is None else {"placement": placement})
    generator = torch.Generator().manual_seed(0)
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec, std=0.3, generator=generator)
        torch.nn.init.normal_(adapter.b_dec, std=b_dec, generator=generator) if b_dec else None
    return splice(target, base, adapters).eval(), adapters


@pytest.mark.parametrize("family, default", [("qwen2", "mlp_output"), ("gemma", "mlp_output"),
                                             ("gemma2", "mlp_output"), ("gemma3", "mlp_output")])
def test_default_placement_is_recorded_and_honoured(family, default, tmp_path):
    model, adapters = spliced(family)
    assert adapters.meta["placement"] == default and get_placement(model) == default
    loaded = AdapterSet.load(adapters.save(tmp_path / "adapters"))
    assert loaded.meta["placement"] == default


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_residual_placement_adds_after_the_post_mlp_norm(family):
    model, _ = spliced(family, "residual")
    block, seen = model.model.layers[1], {}
    block.mlp.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    block.post_feedforward_layernorm.register_forward_hook(lambda module, args, out: seen.__setitem__("out", out))
    with torch.no_grad(), mlp_choice(model, "adapter"):
        model(IDS)
        x = seen["x"]
        expected = block.post_feedforward_layernorm.norm(block.mlp.base_mlp(x)) + block.mlp.adapter(x).out
    assert torch.allclose(seen["out"], expected, atol=1e-6)
    with torch.no_grad(), mlp_choice(model, "target"):  # the other choices see the plain norm
        model(IDS)
        assert torch.allclose(seen["out"], block.post_feedforward_layernorm.norm(block.mlp.target_mlp(seen["x"])))
    set_placement(model, "mlp_output")
    assert not hasattr(block.post_feedforward_layernorm, "norm") and get_placement(model) == "mlp_output"


@pytest.mark.parametrize("placement", ["mlp_output", "residual"])
def test_steering_the_hybrid_with_every_feature_gives_the_adapter_model(placement):
    """With b_dec = 0, the hybrid plus every feature's decoder contribution is the adapter model, whichever
    placement (the steering hook follows the adapters' placement)."""
    model, _ = spliced("gemma2", placement, b_dec=0.0)
    with torch.no_grad():
        with mlp_choice(model, "adapter"):
            reference = model(IDS).logits
        set_mlp_choice(model, "base")
        with add_feature_directions(model, {layer: list(range(16)) for layer in range(3)}):
            steered = model(IDS).logits
        hybrid = model(IDS).logits
    assert torch.allclose(steered, reference, atol=1e-5)
    assert not torch.allclose(hybrid, reference, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_training_lowers_the_kl_with_default_settings(family):
    """Default TrainConfig (lr, L1, bridges) and the family's default placement, a few steps on a tiny pair."""
    result = measure(family, "residual", steps=60)
    assert result["adapter_kl"] < 0.9 * result["hybrid_kl"], result
    assert result["max_train_kl"] < 2 * result["hybrid_kl"], "training diverged"
