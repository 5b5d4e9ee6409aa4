"""The MLP difference an adapter stands in for, at its placement (``tdlib.splice.mlp_difference``): FVU and the
local-MSE transcoder compare adapters with it; under the "residual" placement (Gemma 2 / 3) it is the difference
of the blocks' residual writes, norm(target_mlp(x)) - norm(base_mlp(x)), not of the raw MLP outputs."""
import pytest
import torch

from families import family_model
from tdlib.adapter import AdapterOutput, AdapterSet, TranscoderAdapter
from tdlib.faithfulness import evaluate_replacement
from tdlib.splice import enable_gradient_checkpointing, mlp_choice, mlp_difference, spliced_mlps, splice
from tdlib.train import TrainConfig, init_local_mse_decoder, local_mse_objective, objective, target_mlp_inputs

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}


def spliced(family="gemma2", placement="residual", n_features=16):
    base, target = family_model(family, seed=0), family_model(family, seed=1)
    adapters = AdapterSet.for_model(target, n_features, meta={"placement": placement})
    generator = torch.Generator().manual_seed(0)
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec, std=0.3, generator=generator)
    return splice(target, base, adapters).eval()


class Oracle(TranscoderAdapter):
    """An adapter whose output is ``truth(x)`` (its features still fire, so L0 and FVU are computed)."""

    def __init__(self, adapter: TranscoderAdapter, truth):
        super().__init__(adapter.config)
        self.load_state_dict(adapter.state_dict())
        self._truth = [truth]

    def forward(self, x):
        acts = self.features(self.encode(x))
        return AdapterOutput(self._truth[0](x), acts)


def with_oracles(model, truth_of):
    for mlp in spliced_mlps(model):
        mlp.adapter = Oracle(mlp.adapter, truth_of(mlp))
    return model


def post_norm(model, layer):
    return getattr(model.model.layers[layer].post_feedforward_layernorm, "norm")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_residual_difference_is_what_the_adapter_must_add(family):
    model = spliced(family)
    mlps = spliced_mlps(model)
    inputs = target_mlp_inputs(model, BATCH)
    for layer, mlp in enumerate(mlps):
        x = inputs[layer]
        norm = post_norm(model, layer)
        expected = norm(mlp.target_mlp(x)) - norm(mlp.base_mlp(x))
        assert torch.allclose(mlp_difference(mlp, x), expected, atol=1e-6)
        assert not torch.allclose(expected, mlp.target_mlp(x) - mlp.base_mlp(x), atol=1e-3)  # the norm matters
    # an adapter that adds exactly this difference turns the hybrid into the target
    with_oracles(model, lambda mlp: lambda x, mlp=mlp: mlp_difference(mlp, x))
    with torch.no_grad():
        with mlp_choice(model, "target"):
            target_logits = model(IDS).logits
        with mlp_choice(model, "adapter"):
            adapter_logits = model(IDS).logits
    assert torch.allclose(adapter_logits, target_logits, atol=1e-4)


def test_fvu_of_an_adapter_equal_to_the_exact_difference_is_zero_under_either_placement():
    for placement in ("residual", "mlp_output"):
        model = with_oracles(spliced("gemma2", placement), lambda mlp: lambda x, mlp=mlp: mlp_difference(mlp, x))
        result = evaluate_replacement(model, [BATCH])
        assert max(result["fvu_by_layer"]) < 1e-8 and max(result["fvu_target_inputs_by_layer"]) < 1e-8
        assert result["kl"] < 1e-6  # the oracle reproduces the target, so its own inputs are the target's
    # the raw MLP difference is the wrong reference under "residual": such an adapter explains far from all of it
    raw = with_oracles(spliced("gemma2", "residual"),
                       lambda mlp: lambda x, mlp=mlp: mlp.target_mlp(x) - mlp.base_mlp(x))
    assert min(evaluate_replacement(raw, [BATCH])["fvu_target_inputs_by_layer"]) > 0.1


def test_local_mse_fits_the_difference_at_the_placement():
    model = spliced("gemma2", "residual")
    config = TrainConfig(kind="local_mse", l1_weight=0.0, n_features=16)
    init_local_mse_decoder(model, BATCH)
    inputs = target_mlp_inputs(model, BATCH)
    expected_loss = 0.0
    for layer, mlp in enumerate(spliced_mlps(model)):
        x = inputs[layer]
        norm = post_norm(model, layer)
        difference = norm(mlp.target_mlp(x)) - norm(mlp.base_mlp(x))
        assert torch.allclose(mlp.adapter.b_dec, difference.reshape(-1, difference.shape[-1]).mean(0), atol=1e-5)
        expected_loss += float(((mlp.adapter(x).out - difference) ** 2).sum().detach()) / IDS.numel()
    result = local_mse_objective(model, BATCH, config)
    assert float(result.loss.detach()) == pytest.approx(expected_loss, rel=1e-5)


def test_gradient_checkpointing_leaves_no_adapter_output_behind():
    """Checkpoint recomputation stops after the last saved tensor, before the post-MLP norm takes the adapter's
    output; a following forward (the target, another length) must not see it."""
    model = spliced("gemma2", "residual")
    enable_gradient_checkpointing(model)
    model.train()
    config = TrainConfig(n_features=16, gradient_checkpointing=True)
    objective(model, BATCH, config, cut=1).loss.backward()
    shorter = IDS[:, :7]
    with torch.no_grad(), mlp_choice(model, "target"):
        logits = model(shorter).logits
    reference = family_model("gemma2", seed=1)
    with torch.no_grad():
        assert torch.allclose(logits, reference(shorter).logits, atol=1e-5)
