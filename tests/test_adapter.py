import json

import pytest
import torch

from tdlib.adapter import AdapterConfig, AdapterSet, TranscoderAdapter


def test_fresh_adapter_is_a_no_op_and_sparse_shaped():
    adapter = TranscoderAdapter(AdapterConfig(d_model=8, n_features=20))
    x = torch.randn(3, 5, 8)
    out, acts = adapter(x)
    assert out.shape == x.shape and acts.shape == (3, 5, 20)
    assert torch.equal(out, torch.zeros_like(out))
    assert (acts >= 0).all()
    assert torch.allclose(acts, torch.relu(x @ adapter.W_enc.T))
    bound = 1 / 8 ** 0.5
    assert adapter.W_enc.abs().max() <= bound


def test_decode_is_linear_in_the_activations():
    adapter = TranscoderAdapter(AdapterConfig(d_model=4, n_features=6))
    torch.nn.init.normal_(adapter.W_dec)
    acts = torch.rand(2, 6)
    assert torch.allclose(adapter.decode(acts), acts @ adapter.W_dec.T + adapter.b_dec)
    assert torch.allclose(adapter.decoder_norms(), adapter.W_dec.norm(dim=0))


@pytest.mark.parametrize("bad", [{"d_model": 0, "n_features": 4}, {"d_model": 4, "n_features": -1},
                                 {"d_model": 4.0, "n_features": 4}])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="positive integer"):
        AdapterConfig(**bad)


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    adapters = AdapterSet(AdapterConfig(d_model=8, n_features=12), layers=[0, 2], meta={"l1_weight": 0.01})
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec)
    path = adapters.save(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    loaded = AdapterSet.load(path)
    assert loaded.layers == [0, 2] and loaded.meta == {"l1_weight": 0.01} and 1 not in loaded
    for name, tensor in adapters.adapters.state_dict().items():
        assert torch.equal(tensor, loaded.adapters.state_dict()[name])
    assert json.loads((path / "adapter_config.json").read_text())["config"] == {"d_model": 8, "n_features": 12}


def test_loading_a_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        AdapterSet.load(tmp_path / "nothing")


def test_seeded_initialisation_is_reproducible():
    first = AdapterSet(AdapterConfig(d_model=8, n_features=12), layers=[0, 1], seed=3)
    second = AdapterSet(AdapterConfig(d_model=8, n_features=12), layers=[0, 1], seed=3)
    assert torch.equal(first[1].W_enc, second[1].W_enc)
    assert not torch.equal(first[0].W_enc, first[1].W_enc)
